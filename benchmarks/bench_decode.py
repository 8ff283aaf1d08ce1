"""Decode attention on the GPU: correctness first, then timing against torch (issue 3).

    PYTHONPATH=src python3 benchmarks/bench_decode.py --mode grid   --out DIR   # the issue's grid
    PYTHONPATH=src python3 benchmarks/bench_decode.py --mode sweep  --out DIR   # launch-parameter sweep

Correctness: every configuration is checked with attnforge.verify (float64 oracle) before it is timed.
Timing (DESIGN.md): plain launches with a cold L2, interleaved with the baselines, median of many; and per
layer inside a CUDA graph over 28 distinct KV buffers. Ceilings measured in the same run.
Weights do not exist here: inputs are random; speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from attnforge import verify
from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import decode as decode_mod
from attnforge.kernels import reference
from attnforge.kernels.decode import decode_attention

GRAPH_LAYERS = 28
GRAPH_BYTES_BUDGET = 24 * 2**30
DTYPE = torch.bfloat16


def log(*args) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Correctness on the GPU


def _decode_fn(q, k, v, *, causal, **kwargs):
    assert causal, "decode is always causal"
    return decode_attention(q, k, v, **kwargs)


CORRECTNESS_SHAPES = [
    # batch, Hq, Hkv, Lq, Lkv, D
    (1, 32, 8, 1, 1024, 128),
    (1, 40, 8, 1, 4097, 128),
    (1, 32, 8, 1, 65536, 128),
    (2, 16, 8, 4, 1000, 64),
    (3, 32, 1, 16, 4097, 128),
    (2, 32, 32, 1, 63, 64),
    (8, 28, 4, 1, 16384, 128),
    (4, 16, 2, 7, 1000, 80),
    (2, 16, 4, 3, 2049, 96),
    (2, 8, 2, 1, 8191, 256),
    (256, 8, 1, 1, 65, 128),
    (1, 4, 4, 1, 1, 64),
]


def correctness() -> list[dict]:
    """The protocol on the GPU: every shape in bf16 and fp16, the first two in fp32 too."""
    runs = [(shape, dtype) for shape in CORRECTNESS_SHAPES for dtype in (torch.bfloat16, torch.float16)]
    runs += [(shape, torch.float32) for shape in CORRECTNESS_SHAPES[:2]]
    rows = []
    for sizes, dtype in runs:
        for case in verify.protocol_cases(verify.Shape(*sizes), dtype=dtype, device="cuda", causal=True):
            report = verify.check(_decode_fn, case)
            rows.append({"case": report.case, "passed": report.passed, "max_rel_l2": report.max_rel_l2,
                         "reason": report.reason})  # fmt: skip
    return rows


def capture_checks() -> dict:
    """torch.compile(fullgraph=True) and a captured CUDA graph replay give the same result as eager."""
    case = verify.poisoned_case(verify.Shape(4, 32, 8, 1, 8192, 128), dtype=DTYPE, device="cuda", causal=True)
    eager = decode_attention(case.q, case.k, case.v, kv_lens=case.kv_lens)

    compiled = torch.compile(lambda q, k, v, n: decode_attention(q, k, v, kv_lens=n), fullgraph=True)
    from_compile = compiled(case.q, case.k, case.v, case.kv_lens)

    out = torch.full_like(case.q, math.nan)
    static_q = case.q.clone()
    decode_attention(static_q, case.k, case.v, kv_lens=case.kv_lens, out=out)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(static_q, case.k, case.v, kv_lens=case.kv_lens, out=out)
    out.fill_(math.nan)
    graph.replay()
    first = out.clone()
    fresh_q = torch.randn_like(static_q)
    static_q.copy_(fresh_q)
    graph.replay()  # replay with new inputs: counters must have reset, result must follow the inputs
    expected_fresh = decode_attention(fresh_q, case.k, case.v, kv_lens=case.kv_lens)
    torch.cuda.synchronize()
    return {
        "compile_fullgraph_equal": bool(torch.equal(from_compile, eager)),
        "graph_replay_equal": bool(torch.equal(first, eager)),
        "graph_replay_fresh_inputs_equal": bool(torch.equal(out, expected_fresh)),
        "graph_replay_rel_l2_vs_oracle": float(verify.relative_l2_per_slice(first, case.reference()).max()),
    }


# ------------------------------------------------------------------------------------------------------------
# Providers


def _repeat_kv_static(q, k, v, kv_lens):
    """What transformers does with a static cache: repeat K/V over the whole buffer, mask invalid keys."""
    return reference.sdpa(q, k, v, causal=True, kv_lens=kv_lens, repeat_kv=True)


def providers_for(q, k, v, kv_lens, out, params=None) -> dict:
    def ours():
        if params is None:
            return decode_attention(q, k, v, kv_lens=kv_lens, out=out)
        return decode_mod.launch_decode(
            q, k, v, out, scale=1 / math.sqrt(q.shape[3]), kv_lens=kv_lens, params=params
        )

    result = {"attnforge": ours}
    if kv_lens is None:
        result["sdpa_gqa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True
        )
        result["sdpa_repeat_kv"] = lambda: reference.sdpa(q, k, v, repeat_kv=True)
    else:
        result["sdpa_gqa_masked"] = lambda: reference.sdpa(q, k, v, causal=True, kv_lens=kv_lens)
        result["hf_repeat_kv_masked"] = lambda: _repeat_kv_static(q, k, v, kv_lens)
        result["sdpa_per_sequence"] = lambda: reference.sdpa_per_sequence(
            q, k, v, causal=True, kv_lens=kv_lens
        )
    return result


def _correct(fn, q, k, v, kv_lens) -> tuple[bool, float]:
    """Oracle check of one provider's output, one sequence at a time so float64 copies stay small."""
    got = fn()
    errors = []
    for b in range(q.shape[0]):
        lens = None if kv_lens is None else kv_lens[b : b + 1]
        ref = verify.reference_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], causal=True, kv_lens=lens)
        errors.append(float(verify.relative_l2_per_slice(got[b : b + 1], ref).max()))
    err = max(errors)
    return err <= verify.tolerance_for(q.dtype), err


def _make_inputs(b, hq, hkv, lq, buffer_len, d, kv_lens=None):
    q = torch.randn(b, hq, lq, d, device="cuda", dtype=DTYPE)
    k = torch.randn(b, hkv, buffer_len, d, device="cuda", dtype=DTYPE)
    v = torch.randn(b, hkv, buffer_len, d, device="cuda", dtype=DTYPE)
    if kv_lens is not None:  # a static cache holds zeros beyond the valid length
        for bi, end in enumerate(kv_lens.tolist()):
            k[bi, :, end:] = 0
            v[bi, :, end:] = 0
    return q, k, v


def _affordable_reps(providers: dict, reps: int, budget_s: float = 1.5) -> int:
    """Fewer repetitions for slow shapes: about budget_s seconds for all providers together."""
    if not providers:
        return reps
    probe = timing.time_interleaved(providers, reps=2, warmup=1, cold_l2=False)
    per_round_us = sum(statistics.median(s) + 120 for s in probe.values())  # +120: the L2 flush
    return int(max(10, min(reps, budget_s * 1e6 / per_round_us)))


def bytes_read(b, hq, hkv, lq, d, valid_total) -> int:
    """The fewest bytes: q once, the valid K and V once, the output written once."""
    return 2 * (2 * hkv * valid_total * d + 2 * b * hq * lq * d)


def measure(config: dict, bandwidth: float, reps: int, graph: bool = True) -> dict:
    """Plain cold-L2 timing of every correct provider, then graph-mode timing of ours vs sdpa."""
    kv_lens = config.get("kv_lens")
    kv_lens_t = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    result = _measure_plain(config, kv_lens_t, bandwidth, reps)
    torch.cuda.empty_cache()
    if graph and "median_us" in result["providers"]["attnforge"]:
        per_call = result["providers"]["attnforge"]["median_us"]
        graph_reps = int(max(3, min(30, 0.4e6 / (GRAPH_LAYERS * per_call))))
        result["graph"] = measure_graph(config, kv_lens_t, reps=graph_reps)
        result["graph"]["floor_us"] = result["floor_us"]
        torch.cuda.empty_cache()
    return result


def _measure_plain(config: dict, kv_lens_t, bandwidth: float, reps: int) -> dict:
    b, hq, hkv, lq, lkv, d = (config[key] for key in ("B", "Hq", "Hkv", "Lq", "Lkv", "D"))
    q, k, v = _make_inputs(b, hq, hkv, lq, lkv, d, kv_lens_t)
    out = torch.empty_like(q)
    providers = providers_for(q, k, v, kv_lens_t, out)
    status = {}
    for name, fn in list(providers.items()):
        try:
            ok, err = _correct(
                (lambda f=fn: (f(), out)[1]) if name == "attnforge" else fn, q, k, v, kv_lens_t
            )
        except Exception as error:  # a baseline that cannot run this shape (e.g. out of memory) is reported
            status[name] = {"correct": False, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            providers.pop(name)
            continue
        status[name] = {"correct": ok, "max_rel_l2": err}
        if not ok:
            providers.pop(name)  # an incorrect provider is never timed
    reps = _affordable_reps(providers, reps)
    samples = timing.time_interleaved(providers, reps=reps, warmup=3) if providers else {}
    valid_total = int(kv_lens_t.sum()) if kv_lens_t is not None else b * lkv
    floor_us = bytes_read(b, hq, hkv, lq, d, valid_total) / bandwidth * 1e6
    result = {**config, "floor_us": floor_us, "providers": {}}
    for name, st in status.items():
        entry = dict(st)
        if name in samples:
            entry.update(timing.summarize(samples[name]))
            entry["samples_us"] = [round(x, 3) for x in samples[name]]
            entry["pct_of_floor"] = 100 * floor_us / entry["median_us"]
        result["providers"][name] = entry
    if b == 1:  # host-side cost per call, which eager users pay on top of the GPU time above
        result["host_overhead_us"] = {name: timing.host_overhead_us(providers[name]) for name in samples}
    return result


def measure_graph(config: dict, kv_lens_t, reps: int) -> dict:
    """Per-layer time inside one CUDA graph of 28 calls over distinct KV buffers, ours vs sdpa."""
    b, hq, hkv, lq, lkv, d = (config[key] for key in ("B", "Hq", "Hkv", "Lq", "Lkv", "D"))
    kv_bytes = 2 * 2 * b * hkv * lkv * d
    # Buffers far larger than L2 need not be distinct to keep L2 cold.
    distinct = max(1, min(GRAPH_LAYERS, GRAPH_BYTES_BUDGET // max(kv_bytes, 1)))
    buffers = [_make_inputs(b, hq, hkv, lq, lkv, d, kv_lens_t) for _ in range(distinct)]
    outs = [torch.empty_like(buffers[0][0]) for _ in range(distinct)]
    result = {"distinct_buffers": int(distinct)}

    def ours(i):
        q, k, v = buffers[i % distinct]
        return lambda: decode_attention(q, k, v, kv_lens=kv_lens_t, out=outs[i % distinct])

    def sdpa(i):
        q, k, v = buffers[i % distinct]
        if kv_lens_t is None:
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return lambda: reference.sdpa(q, k, v, causal=True, kv_lens=kv_lens_t)

    for name, maker in (("attnforge", ours), ("sdpa_gqa", sdpa)):
        try:
            samples = timing.time_graph_per_call(maker, layers=GRAPH_LAYERS, reps=reps)
            result[name] = timing.summarize(samples)
        except Exception as error:
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return result


# ------------------------------------------------------------------------------------------------------------
# Grids


def grid_configs() -> list[dict]:
    """The issue's grid (batch-1 first), then the static-cache and ragged cases."""
    configs = []
    heads = [(16, 8), (32, 8), (40, 8), (32, 32), (32, 1)]
    for b, lkv, (hq, hkv), d in itertools.product((1, 8, 32), (1024, 4096, 16384, 65536), heads, (64, 128)):
        configs.append({"group": "grid", "B": b, "Hq": hq, "Hkv": hkv, "Lq": 1, "Lkv": lkv, "D": d})
    specials = []
    specials.append({"group": "static-cache", "B": 1, "Hq": 32, "Hkv": 8, "Lq": 1, "Lkv": 32768, "D": 128,
                    "kv_lens": [4096]})  # fmt: skip
    ragged = [1024, 3072, 5120, 7168, 9216, 11264, 13312, 16384]
    specials.append({"group": "ragged", "B": 8, "Hq": 32, "Hkv": 8, "Lq": 1, "Lkv": 16384, "D": 128,
                    "kv_lens": ragged})  # fmt: skip
    return configs[:20] + specials + configs[20:]


def select_configs(mode: str, batches: list[int] | None = None) -> list[dict]:
    """The grid ("grid"), or its batch-1 GQA 32:8 d128 rows plus the special cases ("quick"); then only the
    rows whose batch size is in `batches`, when given."""
    configs = grid_configs()
    if mode == "quick":
        configs = [
            c
            for c in configs
            if c["group"] != "grid" or (c["B"], c["Hq"], c["Hkv"], c["D"]) == (1, 32, 8, 128)
        ]
    return [c for c in configs if not batches or c["B"] in batches]


SWEEP_SHAPES = [(1, 32, 8, 1, n, 128) for n in (1024, 4096, 16384, 65536)] + [(8, 32, 8, 1, 4096, 128)]


def sweep_params(lkv: int, slots: int, sms: int = 132) -> list[dict]:
    """Whole-wave split counts (1 or 2 programs per SM), 64/128-key tiles, 2 or 3 pipeline stages."""
    out = []
    for block_n, stages, programs_per_sm in itertools.product((64, 128), (2, 3), (1, 2)):
        tiles = math.ceil(lkv / block_n)
        splits = max(1, min(tiles, programs_per_sm * sms // slots, 256))
        out.append({"BLOCK_N": block_n, "num_splits": splits, "num_warps": 4, "num_stages": stages})
    unique = {json.dumps(p, sort_keys=True): p for p in out}
    return list(unique.values())


def run_sweep(bandwidth: float, reps: int) -> list[dict]:
    results = []
    for shape in SWEEP_SHAPES:
        results.append(_sweep_one(shape, bandwidth, reps))
        torch.cuda.empty_cache()
    return results


def _sweep_one(shape: tuple, bandwidth: float, reps: int) -> dict:
    b, hq, hkv, lq, lkv, d = shape
    q, k, v = _make_inputs(b, hq, hkv, lq, lkv, d)
    out = torch.empty_like(q)
    slots = b * hkv * max(1, math.ceil(hq // hkv * lq / 64))
    candidates, params_by_key = {}, {}
    for p in sweep_params(lkv, slots):
        key = f"n{p['BLOCK_N']}-s{p['num_splits']}-w{p['num_warps']}-st{p['num_stages']}"

        def fn(p=p):
            decode_mod.launch_decode(q, k, v, out, scale=d**-0.5, params=p)
            return out

        ok, err = _correct(fn, q, k, v, None)
        if ok:
            candidates[key], params_by_key[key] = fn, p
        else:
            log(f"  sweep {key}: WRONG ({err:.2e})")
    candidates["sdpa_gqa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, enable_gqa=True
    )
    samples = timing.time_interleaved(candidates, reps=reps, warmup=3)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    best = min((n for n in medians if n != "sdpa_gqa"), key=medians.get)
    floor_us = bytes_read(b, hq, hkv, lq, d, b * lkv) / bandwidth * 1e6
    log(f"sweep B={b} {hq}:{hkv} Lkv={lkv} d={d}: best {best} {medians[best]:.1f} us, "
        f"sdpa {medians['sdpa_gqa']:.1f} us, floor {floor_us:.1f} us")  # fmt: skip
    bucket = decode_mod.decode_bucket(b, lkv, hq // hkv, lq, d)
    return {"shape": list(shape), "medians_us": medians, "best": best, "best_params": params_by_key[best],
            "floor_us": floor_us, "bucket": bucket}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------


def tuning_entries(sweep: list[dict]) -> dict:
    """tuning.json entries {bucket: {"params", "speedup", "source"}} from a sweep's best configurations."""
    entries = {}
    for row in sweep:
        block_n, splits, warps, stages = (
            int(x[1:] if x[0] != "w" else x[1:]) for x in _parse_key(row["best"])
        )
        speedup = row["medians_us"]["sdpa_gqa"] / row["medians_us"][row["best"]]
        params = {"BLOCK_N": block_n, "num_splits": splits, "num_warps": warps, "num_stages": stages}
        entries[row["bucket"]] = {"params": params, "speedup": round(speedup, 3), "source": "sweep"}
    return entries


def _parse_key(key: str) -> list[str]:
    n, s_, w, st = key.split("-")
    return [n, s_, w, st[1:]]


def install_sweep_params(record: dict) -> None:
    """Make the kernel use the sweep's best parameters (as if they were in tuning.json) for this run."""
    from attnforge.kernels import tuning

    table = tuning.load_table()
    table.setdefault(tuning.gpu_key("cuda"), {}).setdefault("decode", {}).update(
        tuning_entries(record["sweep"])
    )
    decode_mod._launch_params.cache_clear()


def summary_table(results: list[dict]) -> str:
    lines = ["| group | B | Hq:Hkv | Lkv | D | floor us | attnforge us (% floor) | sdpa_gqa us "
             "| repeat_kv us "
             "| per-seq us | speedup vs best torch | graph: ours / sdpa us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        p = r["providers"]

        def med(name, p=p):
            return p.get(name, {}).get("median_us")

        ours = med("attnforge")
        torch_times = [t for n, t in ((n, med(n)) for n in p if n != "attnforge") if t is not None]
        best = min(torch_times) if torch_times else None
        sdpa = med("sdpa_gqa") or med("sdpa_gqa_masked")
        rep = med("sdpa_repeat_kv") or med("hf_repeat_kv_masked")
        g = r.get("graph", {})
        graph = f"{g.get('attnforge', {}).get('median_us', float('nan')):.1f} / " \
                f"{g.get('sdpa_gqa', {}).get('median_us', float('nan')):.1f}"  # fmt: skip

        def fmt(x):
            return "-" if x is None else f"{x:.1f}"

        pct = f" ({p['attnforge']['pct_of_floor']:.0f}%)" if ours else " (incorrect)"
        speed = f"{best / ours:.2f}x" if ours and best else "-"
        lines.append(f"| {r['group']} | {r['B']} | {r['Hq']}:{r['Hkv']} | {r['Lkv']} | {r['D']} | "
                     f"{r['floor_us']:.1f} | {fmt(ours)}{pct} | {fmt(sdpa)} | {fmt(rep)} | "
                     f"{fmt(med('sdpa_per_sequence'))} | {speed} | {graph} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["grid", "sweep", "quick"], default="grid")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--params-from", type=Path, help="a sweep JSON: use its best launch parameters")
    parser.add_argument("--batches", type=int, nargs="+", help="grid rows of these batch sizes only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = environment_report()
    ceil = timing.ceilings()
    bandwidth = ceil["read_gbps"] * 1e9
    log(f"{env.get('gpu')} driver {env.get('driver')} torch {env['torch']} triton {env['triton']}; "
        f"read {ceil['read_gbps']:.0f} GB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s")  # fmt: skip
    record = {"environment": env, "ceilings": ceil, "mode": args.mode, "dtype": "bfloat16",
              "params_from": str(args.params_from) if args.params_from else None,
              "weights": "random inputs; speed does not depend on values"}  # fmt: skip
    if not args.skip_correctness:
        rows = correctness()
        failed = [r for r in rows if not r["passed"]]
        log(f"correctness: {len(rows) - len(failed)}/{len(rows)} cases pass")
        for r in failed:
            log("  FAIL", r["case"], r["reason"])
        record["correctness"] = rows
        record["capture"] = capture_checks()
        log("capture:", record["capture"])
    if args.params_from:
        install_sweep_params(json.loads(args.params_from.read_text()))
    if args.mode == "sweep":
        record["sweep"] = run_sweep(bandwidth, reps=max(20, args.reps // 3))
    else:
        configs = select_configs(args.mode, args.batches)
        results = record["results"] = []
        for i, config in enumerate(configs):
            results.append(measure(config, bandwidth, reps=args.reps))
            row = summary_table(results[-1:]).splitlines()[-1]
            log(f"[{i + 1}/{len(configs)}] {time.time() - started:.0f}s {row}")
            # Written after every row: a run cut short by its time limit keeps what it measured.
            (args.out / f"decode-{args.mode}.json").write_text(json.dumps(record))
        (args.out / "decode.md").write_text(summary_table(results) + "\n")
        log(summary_table(results))
    (args.out / f"decode-{args.mode}.json").write_text(json.dumps(record, indent=1))
    log(f"done in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
