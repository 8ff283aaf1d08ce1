"""Issue 10 diagnosis (scratch, kept with its results): warps with their own keys (`key_groups`) against
warps sharing each tile, and the L2 flush's write-back. B1 d128 bf16 against torch SDPA (enable_gqa); run from
the repository root with PYTHONPATH=src:

    python key_groups.py OUT.json [SHAPES]     # SHAPES: comma list of names below, default all

Per variant: relative L2 error against float64 SDPA, then plain launches timed by the project's protocol
(`bench.timing.time_interleaved`: interleaved, GPU sleep ahead, median) twice, once after the usual flush
(writing 256 MiB: L2 is left full of dirty lines that the timed call must write back) and once after a read
flush (the same buffer summed: L2 left clean), and per call in a CUDA graph of 28 calls on distinct buffers.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from attnforge.bench import timing
from attnforge.kernels import decode

DEV = "cuda"
SHAPES = {f"{hq}:{hkv} {n // 1024}k": (hq, hkv, n) for hq, hkv in ((32, 8), (40, 8), (16, 8))
          for n in (1024, 4096, 16384, 65536)}  # fmt: skip


def p(n, s, st, w=4, kg=None, combine="last"):
    out = {"BLOCK_N": n, "num_splits": s, "num_warps": w, "num_stages": st, "combine": combine}
    return out if kg is None else {**out, "key_groups": kg}


def variants(n):
    s = 8 if n <= 1024 else 16
    return {
        f"n128-s{s}-st3-kg1": p(128, s, 3, kg=1),
        f"n128-s{s}-st2-kg1-pdl": p(128, s, 2, kg=1, combine="kernel-pdl"),
        f"n128-s{s}-st3-kg4": p(128, s, 3, kg=4),
        f"n128-s{s}-st2-kg4": p(128, s, 2, kg=4),
        f"n64-s{s}-st4-kg4": p(64, s, 4, kg=4),
        f"n128-s{s}-st2-w8-kg8": p(128, s, 2, w=8, kg=8),
        f"n128-s{s}-st3-w8-kg8": p(128, s, 3, w=8, kg=8),
        f"n64-s{2 * s}-st3-kg4": p(64, 2 * s, 3, kg=4),
        f"n64-s{2 * s}-st2-w2-kg2": p(64, 2 * s, 2, w=2, kg=2),
    }


def inputs(hq, hkv, n, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, h, length, 128, device=DEV, dtype=torch.bfloat16, generator=g)
            for h, length in ((hq, 1), (hkv, n), (hkv, n))]  # fmt: skip


def sdpa(q, k, v, out, workspace=None):
    out.copy_(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def ours(params):
    def call(q, k, v, out, workspace=None):
        decode.launch_decode(q, k, v, out, scale=128**-0.5, params=params, workspace=workspace)

    return call


def rel_l2(call, q, k, v):
    out = torch.full_like(q, float("nan"))
    call(q, k, v, out)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    return ((out.double() - ref).norm() / ref.norm()).item()


class ReadFlush:
    """Reads the flush buffer instead of writing it: L2 ends full of clean lines."""

    def __init__(self, device="cuda"):
        self.buffer = torch.zeros(timing.L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.sum()


def plain(calls, q, k, v, read_flush):
    outs = {name: torch.empty_like(q) for name in calls}
    providers = {name: (lambda c=c, o=outs[name]: c(q, k, v, o)) for name, c in calls.items()}
    saved = timing.L2Flusher
    timing.L2Flusher = ReadFlush if read_flush else saved
    try:
        samples = timing.time_interleaved(providers, reps=30, warmup=3, cold_l2=True)
    finally:
        timing.L2Flusher = saved
    return {name: timing.summarize(s)["median_us"] for name, s in samples.items()}


def graph(call, hq, hkv, n):
    sets = [inputs(hq, hkv, n, seed=i + 1) for i in range(28)]
    outs = [torch.empty_like(s[0]) for s in sets]
    spaces = [decode.DecodeWorkspace(DEV, 1 << 22, 4096) for _ in sets]
    make = lambda i: lambda: call(*sets[i], outs[i], spaces[i])  # noqa: E731
    return timing.summarize(timing.time_graph_per_call(make, layers=28, reps=20))["median_us"]


def main(path, names):
    rows, read_gbps = [], timing.measure_read_bandwidth() / 1e9
    for shape in names:
        hq, hkv, n = SHAPES[shape]
        q, k, v = inputs(hq, hkv, n)
        params = variants(n)
        calls = {"sdpa": sdpa, **{name: ours(pr) for name, pr in params.items()}}
        errors = {}
        for name, call in list(calls.items()):
            try:
                errors[name] = rel_l2(call, q, k, v)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                print(shape, name, "error:", type(exc).__name__, str(exc)[:200], flush=True)
                del calls[name]
        ok = {name: c for name, c in calls.items() if errors[name] < 2e-2}
        write_flush, read_flush = plain(ok, q, k, v, False), plain(ok, q, k, v, True)
        floor = 2 * hkv * n * 128 * 2 / (read_gbps * 1e3)
        for name in ok:
            try:
                in_graph = graph(ok[name], hq, hkv, n)
            except Exception as exc:  # noqa: BLE001
                in_graph = f"{type(exc).__name__}: {str(exc)[:120]}"
            rows.append({"shape": shape, "variant": name, "rel_l2": errors[name],
                         "plain_us": write_flush[name], "plain_read_flush_us": read_flush[name],
                         "graph_us": in_graph, "floor_us": floor, "params": params.get(name)})  # fmt: skip
            doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "read_gbps": read_gbps,
                   "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"), "rows": rows}  # fmt: skip
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
        print(f"{shape} done", flush=True)
    print(f"{'shape':9} {'variant':24} {'relL2':>7} {'plain':>6} {'readfl':>6} {'graph':>6} {'floor':>5} "
          f"{'x plain':>7} {'x read':>6} {'x graph':>7}")  # fmt: skip
    base = {r["shape"]: r for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        b, g = base.get(r["shape"]), r["graph_us"]
        gx = b["graph_us"] / g if b and isinstance(g, float) and isinstance(b["graph_us"], float) else 0.0
        g = g if isinstance(g, float) else float("nan")
        print(f"{r['shape']:9} {r['variant']:24} {r['rel_l2']:7.1e} {r['plain_us']:6.1f} "
              f"{r['plain_read_flush_us']:6.1f} {g:6.1f} {r['floor_us']:5.1f} "
              f"{b['plain_us'] / r['plain_us']:6.2f}x "
              f"{b['plain_read_flush_us'] / r['plain_read_flush_us']:5.2f}x {gx:6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES))
