"""`attnforge tune`: measure attnforge's kernels against torch on this GPU, bucket by bucket; store what won.

For each target (one representative call per tuning bucket: the buckets a model's decode and prefill will hit,
or a preset grid), in this order:
  1. correctness: every candidate launch configuration runs the protocol's needle case at the target's exact
     shape (poisoned padding beyond the valid lengths where it has them) against the float64 oracle; one that
     fails is reported and never timed;
  2. timing: the correct candidates and torch's paths for the same call (SDPA with enable_gqa, masked where
     the call needs a mask, and transformers' repeat_kv path) interleaved, each sample after an L2 flush;
  3. the entry: the fastest candidate's parameters and its speed-up over the fastest torch path.
Entries go to the user's tuning table (`tuning.user_table_path()`) unless another is named. Compilation
dominates such a run, so every candidate is compiled first by a pool of worker processes (Triton's on-disk
cache then serves the timing process; `bench/precompile.py`: a candidate whose first launch never ends is
reported as hung there and never launched here).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from attnforge import verify
from attnforge.bench import report, timing
from attnforge.bench.kernels import chunked_reference
from attnforge.bench.precompile import HUNG, precompile
from attnforge.bench.targets import (
    Target,
    check,
    kernel_call,
    make_case,
    torch_calls,
    without_poison,
)
from attnforge.kernels import tuning

GRAPH_MAX_BYTES = 12 * 2**30


# ----------------------------------------------------------------------------------------------------------
# Candidates


def decode_candidates(target: Target, device: torch.device, quick: bool = False) -> list[dict]:
    """Launch configurations to try: the heuristic's, then tile sizes x split counts around it, then
    pipelining depth (as deep as shared memory allows) and warps for the heuristic's tile, and, where the
    query rows of a KV head exceed 16 (MQA, many new tokens), 16-row blocks (fewer if `quick`); where the
    splits' partial rows pass what the last program merges (MERGE_ROWS), each also merged by a second
    kernel; with valid lengths, the split launches (the first four's if `quick`) also with `alone_tiles=0`
    (a sequence of few valid keys split like the others: few sequences a batch leave SMs idle otherwise);
    on Hopper, where the calls can take it (`decode_tma_target`), each also with K/V through TMA (the first
    three only if `quick`)."""
    from attnforge.kernels import decode_params as decode

    rows = target.num_heads // target.num_kv_heads * target.q_len
    element = torch.empty((), dtype=target.torch_dtype).element_size()
    row_bytes = (1 << (target.head_dim - 1).bit_length()) * element
    sms = tuning.sm_count(device)
    base = decode.heuristic_params(target.batch, target.kv_len, target.num_kv_heads, rows, target.head_dim,
                                   element, sms)  # fmt: skip

    def stages(block_n: int, budget: int = decode.SHARED_MEMORY_BUDGET, cap: int = 4) -> int:
        return max(1, min(cap, budget // (2 * block_n * row_bytes)))

    def split_options(block_n: int, block_m: int) -> list[int]:
        units = target.batch * target.num_kv_heads * math.ceil(rows / block_m)
        tiles = math.ceil(target.kv_len / block_n)
        best = decode.heuristic_splits(units, tiles, sms)
        options = {best, max(1, best // 2), min(tiles, 2 * best, decode.MAX_SPLITS), base["num_splits"]}
        if not quick:
            limit = min(tiles, decode.MAX_SPLITS)
            options |= {s for s in (8, 16, 32, 64) if s <= limit and s * units <= 4 * sms}
        return sorted(s for s in options if s <= tiles)

    candidates = [base]
    # the heuristic's row block, all of a KV head's rows in one block, and blocks of 16
    block_ms = list(dict.fromkeys((base["BLOCK_M"], decode.default_block_m(rows), 16)))
    for block_m in block_ms:
        part_rows = decode.partial_rows(block_m, rows)
        for block_n in (base["BLOCK_N"] // 2, base["BLOCK_N"]):
            tile = dict(_merged(base, "last"), BLOCK_M=block_m, BLOCK_N=block_n, num_stages=stages(block_n))
            for s in split_options(block_n, block_m):
                merge = decode.merge_for(s, part_rows)  # a long merge for the last program: both, timed
                candidates += [dict(_merged(tile, m), num_splits=s) for m in dict.fromkeys(("last", merge))]
    hopper_budget = tuning.HOPPER_SHARED_MEMORY
    candidates += [dict(base, num_stages=s) for s in range(2, stages(base["BLOCK_N"], hopper_budget) + 1)]
    # deeper pipelines of the half tile where Hopper's shared memory holds them (5-6 stages; 4 was the most
    # tried before): at 16k keys and more a program streams 16+ tiles (docs/notes/decode.md, "fourth session")
    half = dict(base, BLOCK_N=base["BLOCK_N"] // 2)
    deep = range(stages(half["BLOCK_N"]) + 1, stages(half["BLOCK_N"], hopper_budget, cap=6) + 1)
    candidates += [dict(half, num_stages=s) for s in deep if half["BLOCK_N"] >= 16]
    if not quick:  # two programs an SM (each pipeline in half of Hopper's shared memory), 2-4x the splits
        # of one wave: DRAM serves the SMs unevenly (programs of equal work end up to 15% apart at 64k keys,
        # docs/notes/decode.md), and more, smaller programs let the faster SMs take more of the keys
        two = dict(half, num_stages=stages(half["BLOCK_N"], hopper_budget // 2))
        more = {min(f * base["num_splits"], decode.MAX_SPLITS, math.ceil(target.kv_len / two["BLOCK_N"]))
                for f in (2, 4)}  # fmt: skip
        part_rows = decode.partial_rows(base["BLOCK_M"], rows)
        candidates += [dict(_merged(two, decode.merge_for(n, part_rows)), num_splits=n) for n in sorted(more)]
    if base["num_splits"] > 1:  # the partials merged by the last program or by a second kernel
        candidates += [_merged(base, mode) for mode in decode.COMBINE_MODES]
    if not quick:
        candidates += [dict(base, num_warps=8), dict(base, num_warps=2)]
    if target.valid is not None:  # short sequences split too, not read by split 0 alone (`alone_tiles`)
        candidates += [dict(c, alone_tiles=0) for c in (candidates[:4] if quick else candidates)
                       if c["num_splits"] > 1 and c.get("combine", "last") == "last"]  # fmt: skip
    candidates = _unique(candidates)
    if not quick:  # the last program's merge in two parts / steps that stay in flight, where that changes it
        d_block = 1 << (target.head_dim - 1).bit_length()
        candidates += [dict(c, merge_parts=True) for c in candidates if _merge_parts_differ(c, rows, d_block)]
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if major >= 9 and decode_tma_target(target):
        candidates += [dict(c, tma=True) for c in (candidates if not quick else candidates[:3])]
    return candidates


def _merge_parts_differ(params: dict, rows: int, d_block: int) -> bool:
    """A decode launch that the last program merges runs another merge with "merge_parts" (`DecodeLaunch`):
    two parts (`merge_lo_rows`) or other steps (`merge_chunk`)."""
    from attnforge.kernels import decode_params as decode

    if params["num_splits"] < 2 or params.get("combine", "last") != "last":
        return False
    part_rows = decode.partial_rows(params.get("BLOCK_M") or decode.default_block_m(rows), rows)
    lo = decode.merge_lo_rows(rows, part_rows)
    splits = params["num_splits"]
    plain = decode.merge_chunk(splits, part_rows, 0, d_block, False)
    return lo > 0 or decode.merge_chunk(splits, part_rows, lo, d_block, True) != plain


def decode_tma_target(target: Target) -> bool:
    """The decode calls of `target` can read K/V through TMA (`decode.tma_launchable`; the GPU is checked by
    the caller): half precision, a head_dim in TMA_HEAD_DIMS (targets have no kv_starts)."""
    from attnforge.kernels.decode_params import TMA_HEAD_DIMS

    return target.dtype != "float32" and target.head_dim in TMA_HEAD_DIMS


def prefill_candidates(target: Target, device: torch.device, quick: bool = False) -> list[dict]:
    """The heuristic's configuration and the usual tile / warp / stage alternatives, on Hopper each also with
    K/V through TMA (the first three only if `quick`); on sm_90, unless `quick`, the warp-specialized
    launches ("ws") and the Gluon ones ("gluon", each schedule) where the target's calls can take them."""
    from attnforge.kernels import prefill

    base = prefill.heuristic_params(target.batch, target.num_heads, target.q_len, target.head_dim,
                                    target.torch_dtype, device)  # fmt: skip
    grid = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)]
    if not quick:
        grid += [(128, 64, 8, 4), (64, 128, 4, 2), (128, 32, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)]
    candidates = [base] + [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in grid]
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if major >= 9:  # K/V through TMA too
        candidates += [dict(c, tma=True) for c in (candidates if not quick else candidates[:3])]
    if major == 9 and not quick and warp_spec_target(target):
        from attnforge.kernels.prefill import WS_TILES  # the tiles measured right (64-key ones gave NaN)

        candidates += [dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=s, ws=True) for m, n, s in WS_TILES]
    if major == 9 and not quick and gluon_target(target):
        candidates += gluon_candidates()
    return _unique(candidates)


def gluon_candidates() -> list[dict]:
    """The Gluon launch's configurations: its one tile, each schedule it has (stages, ping-pong,
    persistent)."""
    from attnforge.kernels import prefill_gluon

    tile = dict(BLOCK_M=prefill_gluon.BLOCK_M.value, BLOCK_N=prefill_gluon.BLOCK_N.value, num_warps=4)
    persistent = ({}, {"persistent": True})  # (a name only where it is on)
    return [dict(tile, num_stages=stages, gluon=True, pingpong=pingpong, **persistent[ps])
            for stages, pingpong, ps in prefill_gluon.SCHEDULES]  # fmt: skip


def gluon_target(target: Target) -> bool:
    """The calls of `target` can take the Gluon launch (`prefill.gluon_supported`): half precision, a head_dim
    it has (targets have no attn_mask), and a Triton with Gluon; the GPU is checked by the caller."""
    from attnforge.kernels.prefill import prefill_gluon

    if prefill_gluon is None:
        return False
    return target.dtype != "float32" and target.head_dim in prefill_gluon.HEAD_DIMS


def warp_spec_target(target: Target) -> bool:
    """The calls of `target` can take the warp-specialized launch (`prefill.warp_spec_supported`): half
    precision, a power-of-two head_dim (targets have no attn_mask); the GPU is checked by the caller."""
    return target.dtype != "float32" and target.head_dim & (target.head_dim - 1) == 0


def _merged(params: dict, combine: str) -> dict:
    """`params` merged by `combine` (no key for "last", the default: one name per launch)."""
    out = {k: v for k, v in params.items() if k != "combine"}
    return out if combine == "last" else {**out, "combine": combine}


def _unique(candidates: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in candidates:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def candidates_for(target: Target, device: torch.device, quick: bool = False) -> list[dict]:
    maker = decode_candidates if target.kind == "decode" else prefill_candidates
    return maker(target, device, quick)


def params_name(params: dict) -> str:
    """'m16-n128-s16-w4-st3' / 'm16-n128-s16-w4-st3-mp-tma' (decode) or 'm128-n64-w8-st3-tma' /
    'm128-n128-w4-st2-ws' / 'm128-n128-w4-st3-gluon-pp' / 'm128-n128-w4-st3-gluon-pp-ps' (prefill)."""
    parts = [f"m{params['BLOCK_M']}"] if "BLOCK_M" in params else []
    parts.append(f"n{params['BLOCK_N']}")
    if "num_splits" in params:
        parts.append(f"s{params['num_splits']}")
    parts += [f"w{params.get('num_warps', '?')}", f"st{params.get('num_stages', '?')}"]
    if params.get("combine", "last") != "last":
        parts.append(params["combine"])
    if "alone_tiles" in params:
        parts.append(f"alone{params['alone_tiles']}")
    flags = ["mp"] if params.get("merge_parts") else []
    flags += [name for name in ("tma", "ws", "gluon") if params.get(name)]
    if params.get("gluon"):
        flags += [name for name, key in (("pp", "pingpong"), ("ps", "persistent")) if params.get(key)]
    return "-".join(parts + flags)


# ----------------------------------------------------------------------------------------------------------
# One target


def tune_target(
    target: Target, candidates: list[dict], device, *, reps: int = 30, seed: int = 0, graph_layers: int = 0,
    graph_runners_up: int | None = None, hung: frozenset[str] = frozenset(),
) -> dict:  # fmt: skip
    """Check every candidate, time the correct ones against torch's paths, pick the fastest; with
    `graph_layers`, also time the winner, the `graph_runners_up` next (default GRAPH_RUNNERS_UP) and the
    fastest torch path inside a CUDA graph. Candidates named in `hung` (their first launch never ended in
    the precompile) are reported, never launched."""
    case = make_case(target, device, seed)
    expected = chunked_reference(case)  # big prefill rows: the oracle in slices (bounded memory)
    row = {"target": asdict(target), "label": target.label, "bucket": target.bucket, "seed": seed,
           "candidates": {}, "torch": {}}  # fmt: skip
    calls = {}
    for params in candidates:
        name, out = params_name(params), torch.empty_like(case.q)
        cell = row["candidates"][name] = {"params": params}
        if name in hung:
            cell.update(status="hung", reason=HUNG)
            continue
        try:
            call = kernel_call(target, case, params, out)
            passed, error = check(call, out, expected, case.q.dtype)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            cell.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        cell.update(status="correct" if passed else "incorrect", max_rel_l2=error)
        if passed:
            calls[name] = call
    baselines = {}
    for name, call in torch_calls(without_poison(case)).items():
        out = torch.empty_like(case.q)
        try:
            passed, error = check(call, out, expected, case.q.dtype, padded_rows=case.q_lens)
        except RuntimeError as exc:
            row["torch"][name] = {"status": "n/a", "reason": str(exc).splitlines()[0][:200]}
            continue
        row["torch"][name] = {"status": "correct" if passed else "incorrect", "max_rel_l2": error}
        if passed:
            baselines[name] = call
    if device.type == "cuda" and calls and baselines:
        _time(row, calls, baselines, reps)
        if target.kind == "decode" and graph_layers:
            _time_in_graph(row, target, case, graph_layers, graph_runners_up)
    return row


def _time_in_graph(row: dict, target: Target, case: verify.Case, layers: int,
                   runners_up: int | None = None) -> None:  # fmt: skip
    """The best candidate and the fastest torch path per call inside a captured CUDA graph of `layers` calls,
    each on its own buffers (what a graph-captured decode loop sees: L2 does not hold the cache), with the
    winner merging its splits each way and the runners-up (`_graph_runners_up`): every launch's graph and
    torch's replayed in turn, round after round (`timing.time_graphs_per_call`)."""
    from attnforge.kernels.decode_params import COMBINE_MODES

    bytes_needed = layers * 3 * case.k.numel() * case.k.element_size()
    if bytes_needed > GRAPH_MAX_BYTES:
        row["graph"] = f"skipped: {layers} layers of buffers need {bytes_needed / 2**30:.0f} GiB"
        return
    buffers = [(torch.randn_like(case.q), torch.randn_like(case.k), torch.randn_like(case.v))
               for _ in range(layers)]  # fmt: skip

    def kernel_at(params: dict) -> Callable[[int], Callable[[], object]]:
        return lambda i: kernel_call(target, _layer_case(case, buffers[i]), params, torch.empty_like(case.q))

    params = row["candidates"][row["best"]]["params"]
    makers = {"best": kernel_at(params),
              "torch": lambda i: torch_calls(_layer_case(case, buffers[i]))[row["best_torch"]]}  # fmt: skip
    modes = COMBINE_MODES if params.get("num_splits", 1) > 1 else ()  # does a second kernel pay in a graph?
    makers |= {f"combine {mode}": kernel_at({**params, "combine": mode}) for mode in modes}
    names = _graph_runners_up(row, target, runners_up)
    makers |= {f"runner {name}": kernel_at(row["candidates"][name]["params"]) for name in names}
    timed = timing.time_graphs_per_call(makers, layers=layers, reps=GRAPH_ROUNDS)
    us = {key: samples if isinstance(samples, str) else timing.summarize(samples)["median_us"]
          for key, samples in timed.items()}  # fmt: skip
    best, torch_cell = row["candidates"][row["best"]], row["torch"][row["best_torch"]]
    for cell, key in ((best, "best"), (torch_cell, "torch")):
        cell["graph_median_us" if isinstance(us[key], float) else "graph_error"] = us[key]
    if "graph_median_us" in best and "graph_median_us" in torch_cell:
        row["graph_speedup"] = torch_cell["graph_median_us"] / best["graph_median_us"]
    row["graph"] = (f"CUDA graph of {layers} calls on distinct buffers, each launch's and torch's replayed "
                    f"in turn, {GRAPH_ROUNDS} rounds, per-call median")  # fmt: skip
    if modes:
        row["graph_combine_us"] = {mode: us[f"combine {mode}"] for mode in modes}
    row["graph_runners_up_us"] = {name: us[f"runner {name}"] for name in names}


def _graph_runners_up(row: dict, target: Target, runners_up: int | None) -> list[str]:
    """The `runners_up` (default GRAPH_RUNNERS_UP) fastest plain candidates after the winner, and the fastest
    other whose pipeline fits twice on an SM: with PDL, the next call's programs can then wait on the SMs
    while this call's programs run, instead of launching after them."""
    timed = {name: cell["median_us"] for name, cell in row["candidates"].items() if "median_us" in cell}
    ranked = [name for name in sorted(timed, key=timed.get) if name != row["best"]]
    count = GRAPH_RUNNERS_UP if runners_up is None else runners_up
    halves = [n for n in ranked[count:] if pipeline_bytes(row["candidates"][n]["params"], target)
              <= HALF_SM_BYTES]  # fmt: skip
    return ranked[:count] + halves[:1]


# Shared memory of half a Hopper SM (228 KB an SM).
HALF_SM_BYTES = 112 * 1024


def pipeline_bytes(params: dict, target: Target) -> int:
    """`tuning.pipeline_bytes` of a launch for `target`."""
    element = torch.empty((), dtype=target.torch_dtype).element_size()
    return tuning.pipeline_bytes(params, target.head_dim, element)


def _layer_case(case: verify.Case, qkv: tuple) -> verify.Case:
    q, k, v = qkv
    return dataclasses.replace(case, q=q, k=k, v=v)


def _time(row: dict, calls: dict, baselines: dict, reps: int) -> None:
    samples = timing.time_interleaved({**calls, **baselines}, reps=reps, warmup=3, cold_l2=True)
    for name, values in samples.items():
        cell = row["candidates"].get(name) or row["torch"][name]
        cell.update(timing.summarize(values), samples_us=values)
    best = min(calls, key=lambda n: row["candidates"][n]["median_us"])
    best_torch = min(baselines, key=lambda n: row["torch"][n]["median_us"])
    first = next(iter(row["candidates"]))  # the heuristic's configuration
    best_us, torch_us = row["candidates"][best]["median_us"], row["torch"][best_torch]["median_us"]
    row.update(best=best, best_us=best_us, best_torch=best_torch, torch_us=torch_us,
               speedup=torch_us / best_us, heuristic=first,
               heuristic_speedup=torch_us / row["candidates"][first]["median_us"]
               if "median_us" in row["candidates"][first] else None)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The run and its entries


def run(targets: list[Target], *, quick: bool = False, reps: int = 30, workers: int | None = None,
        graph_layers: int = 0, graph_runners_up: int | None = None,
        progress: Callable[[int, str], None] | None = None, checkpoint: Callable[[dict], None] | None = None,
        time_budget_s: float | None = None) -> dict:  # fmt: skip
    """Tune every target (GPU: correctness, then timing; CPU: correctness only); the result document.
    `graph_layers` / `graph_runners_up`: `tune_target`'s.

    `checkpoint(doc)` is called after every row with the document so far (a run cut short keeps its rows);
    no target is started after `time_budget_s` seconds (they are listed in `not_run`).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    plan = [(t, candidates_for(t, device, quick)) for t in targets]
    workers = workers if workers is not None else min(16, max(1, (os.cpu_count() or 2) - 2))
    compile_s, hung = precompile(plan, workers, params_name)
    if (
        device.type == "cuda" and plan
    ):  # a first pass, discarded: the first target's samples once scattered 3x
        tune_target(plan[0][0], plan[0][1], device, reps=reps, hung=_names(hung, plan[0][0]))
    ceilings = {"read_gbps": timing.measure_read_bandwidth() / 1e9} if device.type == "cuda" else None
    rows = []
    doc = {
        "what": "tuning",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": report.run_environment(),
        "method": _method(device, reps),
        "ceilings": ceilings,
        "rows": rows,
        "compile_s": compile_s,
        "hung": sorted(f"{label}: {name}" for label, name in hung),
        "not_run": [t.label for t in targets],
    }
    for index, (target, candidates) in enumerate(plan):
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            break  # the rest stay in doc["not_run"]
        if progress is not None:
            progress(index, target.label)
        row = tune_target(target, candidates, device, reps=reps, seed=index, graph_layers=graph_layers,
                          graph_runners_up=graph_runners_up, hung=_names(hung, target))  # fmt: skip
        if ceilings is not None and target.kind == "decode":
            row["floor_us"] = read_bytes(target) / (ceilings["read_gbps"] * 1e3)
        rows.append(row)
        doc["not_run"].remove(target.label)
        doc["elapsed_s"] = time.monotonic() - started
        if checkpoint is not None:
            checkpoint(doc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return doc


def _names(hung: set[tuple[str, str]], target: Target) -> frozenset[str]:
    """The names of `target`'s candidates among the precompile's hung (label, name) pairs."""
    return frozenset(name for label, name in hung if label == target.label)


def read_bytes(target: Target) -> int:
    """Bytes a kernel must move: q and the output once, and the valid keys and values once."""
    element = torch.empty((), dtype=target.torch_dtype).element_size()
    valid = sum(target.valid) if target.valid is not None else target.batch * target.kv_len
    q = target.batch * target.num_heads * target.q_len * target.head_dim
    return element * (2 * q + 2 * target.num_kv_heads * valid * target.head_dim)


def _method(device: torch.device, reps: int) -> str:
    if device.type != "cuda":
        return "correctness only (no CUDA GPU): each candidate on the target's needle case vs the oracle"
    return (
        "each candidate launch configuration checked on the target's needle case (NaN/Inf beyond the valid "
        "lengths) against the float64 oracle, incorrect ones never timed; then CUDA events around each call, "
        f"{reps} samples per candidate and per torch path, all interleaved, 256 MiB L2 flush (a read) before "
        "every sample; medians. Speed-up = fastest correct torch path / fastest correct candidate."
    )


def entries(doc: dict, source: str) -> dict[str, dict[str, dict]]:
    """Tuning-store entries {kind: {bucket: {params, speedup, source, graph fields}}} from a tuning result
    document (`graph_choice`).

    A bucket measured by several targets keeps the most conservative speed-up (and that row's parameters);
    a disturbed row (`disturbed`) gives none.
    """
    out: dict[str, dict[str, dict]] = {}
    for row in doc["rows"]:
        if row.get("speedup") is None or disturbed(row) is not None:
            continue
        kind, bucket = row["target"]["kind"], _bucket_of(row)
        entry = {"params": row["candidates"][row["best"]]["params"], "speedup": round(row["speedup"], 3),
                 "source": source, **graph_choice(row)}  # fmt: skip
        current = out.setdefault(kind, {}).get(bucket)
        if current is None or entry["speedup"] < current["speedup"]:
            out[kind][bucket] = entry
    return out


# How much faster (per call, in a CUDA graph) another way of merging the splits, or another launch, must be
# than the plain winner for captured calls to use it: graph medians of one run moved ~1% between runs (H100).
GRAPH_MARGIN = 1.02
# The plain runners-up also timed in the graph (the fastest launch there need not be the plain winner).
GRAPH_RUNNERS_UP = 3
# Rounds of graph replays (one of each launch's graph a round).
GRAPH_ROUNDS = 20


def graph_choice(row: dict) -> dict:
    """The entry's graph fields: `graph_speedup` (fastest torch path / the kernel per call in a CUDA graph),
    and where something was faster there than the plain winner by GRAPH_MARGIN, the fastest of them: another
    merge of the winner's splits (`graph_combine`) or a plain runner-up's whole launch (`graph_params`); {}
    when the row has no graph timing."""
    torch_us = row.get("torch", {}).get(row.get("best_torch"), {}).get("graph_median_us")
    if not torch_us:
        return {}
    params = row["candidates"][row["best"]]["params"]
    own = params.get("combine", "last")
    modes = {mode: us for mode, us in row.get("graph_combine_us", {}).items() if isinstance(us, float)}
    own_us = modes.get(own, row["candidates"][row["best"]].get("graph_median_us"))
    if own_us is None:
        return {}
    options = {("graph_combine", mode): us for mode, us in modes.items() if mode != own}
    options |= {("graph_params", name): us for name, us in row.get("graph_runners_up_us", {}).items()
                if isinstance(us, float)}  # fmt: skip
    fastest = min(options, key=options.get, default=None)
    if fastest is None or options[fastest] * GRAPH_MARGIN >= own_us:
        return {"graph_speedup": round(torch_us / own_us, 3)}
    field, name = fastest
    value = name if field == "graph_combine" else row["candidates"][name]["params"]
    return {field: value, "graph_speedup": round(torch_us / options[fastest], 3)}


# The widest 95% interval of a median (high / low) an entry's timing may have: wider means the samples were
# disturbed (seen on the first rows of runs on a busy host: 10-130 us for a 10 us call).
STABLE_INTERVAL = 1.2


def disturbed(row: dict) -> str | None:
    """Why the timing of the best candidate or best torch path is too scattered for an entry, or None."""
    cells = [("attnforge", row["candidates"].get(row.get("best"), {}))]
    cells.append(("torch", row.get("torch", {}).get(row.get("best_torch"), {})))
    for side, cell in cells:
        low, high = cell.get("ci95_us") or (0.0, 0.0)
        if low > 0 and high / low > STABLE_INTERVAL:
            return f"{side} median {cell['median_us']:.1f} us with a 95% interval of {low:.1f}-{high:.1f} us"
    return None


def _bucket_of(row: dict) -> str:
    """The row's bucket as the kernels name it now (a saved result may predate a change of names)."""
    fields = dict(row["target"])
    if fields.get("valid") is not None:
        fields["valid"] = tuple(fields["valid"])
    try:
        return Target(**fields).bucket
    except TypeError:  # a row written by a test or another tool: keep the name it recorded
        return row["bucket"]


def store(doc: dict, source: str, table=None) -> str:
    """Write the document's entries into a tuning table (default: the user's); returns its path."""
    env = doc["environment"]
    gpu = tuning.gpu_key() if env.get("device") == "cuda" and torch.cuda.is_available() else None
    gpu = gpu or tuning.gpu_key_from_name(env.get("gpu", ""))
    arch = "sm" + str(env.get("compute_capability", "")).replace(".", "")
    path = None
    for kind, by_bucket in entries(doc, source).items():
        path = tuning.write_entries(gpu, arch, kind, by_bucket, table)
    return str(path or table or tuning.user_table_path())


def markdown(doc: dict) -> str:
    """The tuning document as a Markdown report: environment, method, one row per target."""
    env = doc["environment"]
    lines = [
        f"# attnforge tune on {env.get('gpu', env.get('device'))} — {doc['created'][:10]}",
        "",
        f"Device {env.get('gpu', '-')}, driver {env.get('driver', '-')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}; "
        f"commit {env.get('git_commit')}.",
        f"Ceilings measured in this run: {doc.get('ceilings')}. Compilation {doc.get('compile_s', 0):.0f} s, "
        f"whole run {doc.get('elapsed_s', 0):.0f} s."
        + (
            f" Hung in the precompile (never launched after): {'; '.join(doc['hung'])}."
            if doc.get("hung")
            else ""
        ),
        "",
        f"Method: {doc['method']}",
        "",
        "| target | bucket | best | us | % floor | torch paths us | vs best torch | graph ours / torch us "
        "| graph speed-up | heuristic vs best torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_markdown_row(row) for row in doc["rows"]]
    return "\n".join(lines) + "\n"


def _markdown_row(row: dict) -> str:
    if row.get("speedup") is None:
        failed = [f"{n}: {c.get('reason', c['status'])}" for n, c in row["candidates"].items()
                  if c["status"] != "correct"]  # fmt: skip
        return f"| {row['label']} | {row['bucket']} | not timed | | | | | | | {'; '.join(failed)[:200]} |"
    floor = row.get("floor_us")
    torch_us = ", ".join(f"{n} {c['median_us']:.1f}" for n, c in row["torch"].items() if "median_us" in c)
    percent = f"{100 * floor / row['best_us']:.0f}%" if floor else "-"
    graph, graph_speedup = graph_columns(row)
    heuristic = f"{row['heuristic_speedup']:.2f}x" if row.get("heuristic_speedup") else "-"
    why = disturbed(row)
    speedup = f"{row['speedup']:.2f}x" + (f" (disturbed: {why}; no entry)" if why else "")
    return (f"| {row['label']} | {row['bucket']} | {row['best']} | {row['best_us']:.1f} | {percent} | "
            f"{torch_us} | {speedup} | {graph} | {graph_speedup} | {heuristic} |")  # fmt: skip


def graph_columns(row: dict) -> tuple[str, str]:
    """('ours / torch us', 'speed-up') per call in a CUDA graph as captured calls get them: with the merge
    or launch `graph_choice` picked (named when not the plain winner's); ('-', '-') without graph timing."""
    choice = graph_choice(row)
    if not choice:
        return "-", "-"
    torch_us = row["torch"][row["best_torch"]]["graph_median_us"]
    launch = choice.get("graph_params")
    name = choice.get("graph_combine") or (params_name(launch) if launch else "")
    other = f" ({name})" if name else ""
    ours_us = torch_us / choice["graph_speedup"]
    return f"{ours_us:.1f} / {torch_us:.1f}", f"{choice['graph_speedup']:.2f}x{other}"


def save(doc: dict, out_dir, stem: str) -> list:
    """Write `<stem>.json` (every sample) and `<stem>.md` under out_dir; returns the paths."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    md.write_text(markdown(doc))
    return [report.write_json(doc, out / f"{stem}.json"), md]


__all__ = ["candidates_for", "entries", "run", "store"]
