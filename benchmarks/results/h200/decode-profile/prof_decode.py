"""Issue 10 diagnosis (scratch, kept with its results): decode launch variants against torch SDPA, B1 d128
bf16. Not part of the package; run from the repository root with PYTHONPATH=src.

usage: python prof_decode.py time OUT.json   # correctness, then plain (cold L2) and graph timings
       ncu ... python prof_decode.py ncu        # one profiled call per variant (cudaProfilerStart/Stop)
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from attnforge.kernels import decode

DEV = "cuda"
SHAPES = {"32:8 4k": (32, 8, 4096), "32:8 16k": (32, 8, 16384), "16:8 16k": (16, 8, 16384)}


def p(n, s, w, st, combine="last"):
    return {"BLOCK_N": n, "num_splits": s, "num_warps": w, "num_stages": st, "combine": combine}


VARIANTS = {
    "32:8 4k": {
        "n128-s16-st3": p(128, 16, 4, 3),
        "n64-s16-st4": p(64, 16, 4, 4),
        "n64-s32-st4": p(64, 32, 4, 4),
        "n64-s32-st2": p(64, 32, 4, 2),
        "n64-s64-st2": p(64, 64, 4, 2),
        "n128-s32-st2": p(128, 32, 4, 2),
        "n128-s16-st2-pdl": p(128, 16, 4, 2, "kernel-pdl"),
        "n64-s32-st2-pdl": p(64, 32, 4, 2, "kernel-pdl"),
    },
    "32:8 16k": {
        "n128-s16-st3": p(128, 16, 4, 3),
        "n64-s32-st4": p(64, 32, 4, 4),
        "n64-s32-st2": p(64, 32, 4, 2),
        "n128-s32-st2": p(128, 32, 4, 2),
        "n64-s64-st2": p(64, 64, 4, 2),
        "n128-s16-st2-pdl": p(128, 16, 4, 2, "kernel-pdl"),
        "n64-s32-st2-pdl": p(64, 32, 4, 2, "kernel-pdl"),
        "n128-s16-st4": p(128, 16, 4, 4),
    },
    "16:8 16k": {
        "n128-s16-st3": p(128, 16, 4, 3),
        "n64-s32-st4": p(64, 32, 4, 4),
        "n64-s32-st2": p(64, 32, 4, 2),
    },
}


def inputs(hq, hkv, n, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, hq, 1, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hkv, n, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    return q, k, v


def sdpa(q, k, v, out=None, workspace=None):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def check(call, q, k, v):
    out = torch.full_like(q, float("nan"))
    got = call(q, k, v, out)
    got = out if got is None else got
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    return ((got.double() - ref).norm() / ref.norm()).item()


def time_plain(calls, q, k, v, reps=50):
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    out = torch.empty_like(q)
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call(q, k, v, out)
            b.record()
            b.synchronize()
            samples[name].append(a.elapsed_time(b) * 1000)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_graph(call, hq, hkv, n, layers=28, replays=20):
    sets = [inputs(hq, hkv, n, seed=i) for i in range(layers)]
    outs = [torch.empty_like(s[0]) for s in sets]
    ws = [decode.DecodeWorkspace(DEV, 1 << 22, 4096) for _ in range(layers)]

    def body():
        for (q, k, v), out, w in zip(sets, outs, ws, strict=True):
            call(q, k, v, out, w)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / layers)
    return statistics.median(times)


def ours_ws(params):
    def call(q, k, v, out, w=None):
        decode.launch_decode(q, k, v, out, scale=128**-0.5, params=params, workspace=w)

    return call


def main_time(path):
    rows = []
    for shape, variants in VARIANTS.items():
        hq, hkv, n = SHAPES[shape]
        q, k, v = inputs(hq, hkv, n)
        calls = {"sdpa": sdpa, **{name: ours_ws(pr) for name, pr in variants.items()}}
        errors = {name: check(c, q, k, v) for name, c in calls.items()}
        time_plain(calls, q, k, v, reps=3)  # warm
        plain = time_plain(calls, q, k, v)
        plain2 = time_plain(calls, q, k, v)
        floor = 2 * hkv * n * 128 * 2 / 4.25e6  # us at 4.25 TB/s (the H200's measured read rate)
        for name, call in calls.items():
            graph = time_graph(call, hq, hkv, n)
            rows.append(
                {
                    "shape": shape,
                    "variant": name,
                    "rel_l2": errors[name],
                    "plain_us": plain[name],
                    "plain_us_again": plain2[name],
                    "graph_us": graph,
                    "floor_us": floor,
                    "params": variants.get(name),
                }
            )
            with open(path, "w") as f:
                doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"), "rows": rows}  # fmt: skip
                json.dump(doc, f, indent=1)
    print("shape     variant              relL2   plain   again   graph sdpa/ours  graph")
    base = {r["shape"]: r for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        b = base[r["shape"]]
        print(f"{r['shape']:9} {r['variant']:18} {r['rel_l2']:8.1e} {r['plain_us']:7.1f} "
              f"{r['plain_us_again']:7.1f} {r['graph_us']:7.1f} {b['plain_us'] / r['plain_us']:8.2f}x "
              f"{b['graph_us'] / r['graph_us']:5.2f}x")  # fmt: skip


def main_ncu():
    picks = [
        ("32:8 4k", "n128-s16-st3"),
        ("32:8 4k", "n64-s32-st2"),
        ("32:8 4k", "n128-s16-st2-pdl"),
        ("32:8 16k", "n128-s16-st3"),
        ("32:8 16k", "n64-s32-st2"),
    ]
    runs = [(SHAPES[shape], ours_ws(VARIANTS[shape][name])) for shape, name in picks]
    runs += [(SHAPES[shape], sdpa) for shape in ("32:8 4k", "32:8 16k")]
    for sizes, call in runs:  # a warm call, then the profiled one
        q, k, v = inputs(*sizes)
        out = torch.empty_like(q)
        call(q, k, v, out)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call(q, k, v, out)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main_time(sys.argv[2]) if sys.argv[1] == "time" else main_ncu()
