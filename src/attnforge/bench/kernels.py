"""The kernel sweep: every provider on a grid of attention shapes, correctness before timing.

For each row (`BenchConfig`): draw inputs, check every provider with the correctness protocol (random, needle
and large-logit cases at the row's exact shape, against the float64 oracle); a provider that fails is reported
"incorrect" with the reason and is never timed. The correct ones are timed together, interleaved, each sample
after an L2 flush (timing.time_interleaved). The floor comes from the ceilings measured in the same run:
bytes / read bandwidth and FLOPs / bf16 rate (only visible query-key pairs count, so causal is about half),
whichever is larger. Without a GPU the sweep checks correctness on a tiny grid and times nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import secrets
import time
from collections.abc import Callable, Iterable

import torch

from attnforge import verify
from attnforge.bench import report, stats, timing
from attnforge.bench.providers import BenchConfig, Provider, default_providers, kernel_for, optimizer_decision
from attnforge.kernels import reference

NO_GPU_NOTE = "no CUDA GPU: correctness only (tiny sizes); timings need a CUDA GPU"
# The oracle works on (batch, kv head, query chunk) slices of at most this many logits.
ORACLE_CHUNK_ELEMENTS = 2**26
CHECK_KINDS = ("random", "needle", "large")
# Decode rows are also timed inside a CUDA graph, one call per layer over distinct buffers (DESIGN.md).
GRAPH_LAYERS, GRAPH_REPS, GRAPH_MAX_BYTES = 28, 20, 12 * 2**30
GRAPH_PROVIDERS = ("attnforge-decode", "optimizer", "sdpa-auto", "sdpa-flash", "hf-repeat_kv")


# ----------------------------------------------------------------------------------------------------------
# The grid


def _decode(batch, heads, kv_heads, kv_len, head_dim=128, **options) -> BenchConfig:
    return BenchConfig(batch, heads, kv_heads, options.pop("q_len", 1), kv_len, head_dim, **options)


def _prefill(batch, heads, kv_heads, length, head_dim=128, **options) -> BenchConfig:
    q_len = options.pop("q_len", length)
    return BenchConfig(batch, heads, kv_heads, q_len, length, head_dim, **options)


GQA_SHAPES = [(32, 32), (32, 16), (32, 8), (40, 8), (64, 8), (32, 1)]  # ratios 1, 2, 4, 5, 8 and MQA


def full_grid() -> list[BenchConfig]:
    """Decode (KV 512..128k) and prefill (32..16k) on GPU sizes, bf16, GQA 32:8 d128 unless varied.

    The main series come first, so a run cut short by a time budget still has them.
    """
    rows = [_decode(1, 32, 8, n) for n in (512, 1024, 4096, 16384, 65536, 131072)]
    rows += [_prefill(1, 32, 8, n) for n in (32, 128, 512, 2048, 8192, 16384)]
    rows += [_decode(8, 32, 8, n) for n in (1024, 4096, 16384, 65536)]
    rows += [_decode(1, h, kv, n) for n in (4096, 16384) for h, kv in GQA_SHAPES if (h, kv) != (32, 8)]
    rows += [_prefill(1, h, kv, 2048) for h, kv in GQA_SHAPES if (h, kv) != (32, 8)]
    rows += [_prefill(1, 32, 8, 2048, mask=m) for m in ("none", "bool", "additive")]
    rows += [_decode(8, 32, 8, 4096, ragged=True), _decode(8, 32, 8, 16384, ragged=True)]
    rows += [_prefill(4, 32, 8, 1024), _prefill(4, 32, 8, 1024, ragged=True)]
    rows += [_decode(1, 32, 8, 4096, q_len=4), _prefill(1, 32, 8, 4096, q_len=512)]
    rows += [_decode(1, 32, 8, 4096, head_dim=d) for d in (64, 80)]
    rows += [_prefill(1, 32, 8, 2048, head_dim=d) for d in (64, 80)]
    rows += [_decode(1, 32, 8, 4096, dtype="float16"), _prefill(1, 32, 8, 2048, dtype="float16")]
    return rows


def subset_grid() -> list[BenchConfig]:
    """A few rows of the full grid, one of each kind: a quick look (a minute on an H100)."""
    return [
        _decode(1, 32, 8, 1024),
        _decode(1, 32, 8, 16384),
        _decode(1, 32, 1, 4096),
        _decode(8, 32, 8, 4096),
        _decode(8, 32, 8, 4096, ragged=True),
        _prefill(1, 32, 8, 512),
        _prefill(1, 32, 8, 2048),
        _prefill(1, 32, 8, 2048, mask="bool"),
    ]


def cpu_grid() -> list[BenchConfig]:
    """Tiny float32 shapes for the CPU (correctness only; Triton kernels under TRITON_INTERPRET=1)."""
    rows = [_decode(1, 4, 2, n, head_dim=64, dtype="float32") for n in (1, 65, 300)]
    rows += [_decode(2, 4, 1, 130, head_dim=64, dtype="float32", ragged=True)]
    rows += [_decode(1, 4, 2, 63, head_dim=64, dtype="float32", q_len=3)]
    rows += [_prefill(1, 4, 2, 65, head_dim=64, dtype="float32")]
    rows += [
        _prefill(1, 4, 4, 40, head_dim=64, dtype="float32", mask=m) for m in ("none", "bool", "additive")
    ]
    rows += [_prefill(2, 4, 2, 70, head_dim=64, dtype="float32", q_len=33, ragged=True)]
    return rows


def build_grid(kind: str) -> list[BenchConfig]:
    """The rows of grid `kind`: "full", "subset" or "cpu"."""
    grids: dict[str, Callable[[], list[BenchConfig]]] = {
        "full": full_grid,
        "subset": subset_grid,
        "cpu": cpu_grid,
    }
    if kind not in grids:
        raise ValueError(f"grid={kind!r} is not known; accepted: {sorted(grids)}")
    return grids[kind]()


# ----------------------------------------------------------------------------------------------------------
# Inputs and the oracle for big shapes


class _ChunkedCase(verify.Case):
    """A protocol case whose float64 reference is computed in slices (big rows) and kept for reuse."""

    _expected: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        if self._expected is None:
            self._expected = chunked_reference(self)
        return self._expected


def chunked_reference(case: verify.Case, max_elements: int = ORACLE_CHUNK_ELEMENTS) -> torch.Tensor:
    """`verify.reference_attention` of a case, over (batch, kv head, query chunk) slices to bound memory."""
    q, k, v = case.q, case.k, case.v
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if batch * num_heads * q_len * kv_len <= max_elements:
        return verify.reference_attention(q, k, v, **case.kwargs())
    group = num_heads // num_kv_heads
    chunk = max(1, max_elements // (group * kv_len))
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    user_mask = case.attn_mask
    if user_mask is not None:
        user_mask = user_mask.expand(batch, num_heads, q_len, kv_len)
    for b in range(batch):
        lens = None if case.kv_lens is None else case.kv_lens[b : b + 1]
        visible = reference.visibility_mask(
            1, q_len, kv_len, causal=case.causal, kv_lens=lens, device=q.device
        )
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            for i0 in range(0, q_len, chunk):
                rows = slice(i0, min(q_len, i0 + chunk))
                mask = None if visible is None else visible[:, :, rows]
                if user_mask is not None:
                    part = user_mask[b : b + 1, heads, rows]
                    if mask is None:
                        mask = part
                    elif part.dtype == torch.bool:
                        mask = mask & part
                    else:
                        mask = part.double().masked_fill(~mask, -math.inf)
                out[b : b + 1, heads, rows] = verify.reference_attention(
                    q[b : b + 1, heads, rows],
                    k[b : b + 1, h : h + 1],
                    v[b : b + 1, h : h + 1],
                    scale=case.scale,
                    kv_lens=lens,
                    attn_mask=mask,
                )
    return out


def _row_mask(cfg: BenchConfig, device, generator: torch.Generator) -> torch.Tensor | None:
    """Random bool keep mask or additive bias with -inf holes, `[B, 1, Lq, Lkv]`; key 0 always visible."""
    if cfg.mask not in ("bool", "additive"):
        return None
    shape = (cfg.batch, 1, cfg.q_len, cfg.kv_len)
    keep = torch.rand(shape, generator=generator) > 0.3
    keep[..., 0] = True
    if cfg.mask == "bool":
        return keep.to(device)
    bias = torch.randn(shape, generator=generator).masked_fill(~keep, -math.inf)
    return bias.to(device=device, dtype=cfg.torch_dtype)


def row_cases(
    cfg: BenchConfig, device: torch.device, *, seed: int | None = None, kinds=CHECK_KINDS
) -> list[verify.Case]:
    """The protocol cases of a row, at its exact shape, mask and valid lengths (the first is also timed).

    seed: None draws fresh inputs (the protocol's default); an integer reproduces a row's inputs.
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    shape = verify.Shape(cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.q_len, cfg.kv_len, cfg.head_dim)
    kv_lens = None
    if cfg.ragged:
        low = cfg.q_len
        kv_lens = torch.randint(low, cfg.kv_len + 1, (cfg.batch,), generator=generator)
        kv_lens[0] = max(low, cfg.kv_len // 3)
        kv_lens = kv_lens.to(device=device, dtype=torch.int32)
    mask = _row_mask(cfg, device, generator)
    options = {
        "dtype": cfg.torch_dtype,
        "device": device,
        "causal": cfg.causal,
        "kv_lens": kv_lens,
        "generator": generator,
    }
    makers = {
        "random": lambda: verify.random_case(shape, **options),
        "needle": lambda: verify.needle_case(shape, position="last", **options),
        "large": lambda: verify.large_logits_case(shape, **options),
    }
    unknown = set(kinds) - set(makers)
    if unknown:
        raise ValueError(f"unknown check kinds {sorted(unknown)}; accepted: {sorted(makers)}")
    cases = []
    for kind in kinds:
        case = makers[kind]()
        case.attn_mask = mask
        fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(verify.Case)}
        cases.append(_ChunkedCase(**fields))
    return cases


# ----------------------------------------------------------------------------------------------------------
# Floors


def visible_pairs(cfg: BenchConfig, kv_lens: list[int] | None = None) -> int:
    """Query-key pairs a kernel must compute: all valid keys, or the bottom-right causal triangle."""
    total = 0
    for end in kv_lens or [cfg.kv_len] * cfg.batch:
        if cfg.causal:
            first = end - cfg.q_len  # query i sees keys 0 .. first + i
            total += sum(max(0, min(end, first + i + 1)) for i in range(cfg.q_len))
        else:
            total += cfg.q_len * end
    return total


def row_work(cfg: BenchConfig, kv_lens: list[int] | None = None) -> dict:
    """Bytes a kernel must move (q, valid k and v, out) and FLOPs it must do (QK^T and PV)."""
    element = torch.empty((), dtype=cfg.torch_dtype).element_size()
    valid_keys = sum(kv_lens) if kv_lens else cfg.batch * cfg.kv_len
    q_bytes = cfg.batch * cfg.num_heads * cfg.q_len * cfg.head_dim * element
    kv_bytes = 2 * cfg.num_kv_heads * valid_keys * cfg.head_dim * element
    flops = 4 * cfg.num_heads * cfg.head_dim * visible_pairs(cfg, kv_lens)
    return {"bytes": 2 * q_bytes + kv_bytes, "flops": flops}


def floor_us(work: dict, ceilings: dict | None) -> tuple[float | None, str]:
    """The time floor in us from the measured ceilings, and what bounds it ("memory" or "compute")."""
    if not ceilings:
        return None, "no ceilings (no GPU)"
    memory = work["bytes"] / (ceilings["read_gbps"] * 1e9) * 1e6
    compute = work["flops"] / (ceilings["bf16_tflops"] * 1e12) * 1e6
    return (memory, "memory") if memory >= compute else (compute, "compute")


# ----------------------------------------------------------------------------------------------------------
# One row


def _first_failure(reports: list[verify.Report]) -> verify.Report | None:
    return next((r for r in reports if not r.passed), None)


def _unsupported_by_torch(reason: str) -> bool:
    """torch refusing a backend for these inputs: "n/a", not "incorrect"."""
    return "raised RuntimeError" in reason and ("No available kernel" in reason or "not supported" in reason)


def check_provider(provider: Provider, cases: list[verify.Case]) -> dict:
    """Correctness of one provider on the row's cases: status "correct", "incorrect" or "n/a", and why."""
    fn = provider.checkable()
    reports = []
    for case in cases:
        report = verify.check(fn, case)
        reports.append(report)
        if not report.passed:
            break
    failed = _first_failure(reports)
    worst = max(r.max_rel_l2 for r in reports)
    if failed is None:
        return {"status": "correct", "max_rel_l2": worst, "cases": [r.case.split(" ")[0] for r in reports]}
    case_name = failed.case.split(" ")[0]
    if _unsupported_by_torch(failed.reason):
        return {
            "status": "n/a",
            "reason": f"torch refused these inputs: {failed.reason.splitlines()[0][:200]}",
        }
    return {
        "status": "incorrect",
        "reason": f"{case_name}: {failed.reason.splitlines()[0][:300]}",
        "max_rel_l2": None if math.isinf(worst) else worst,
    }


def _call_options(case: verify.Case) -> dict:
    return {"causal": case.causal, "scale": case.scale, "kv_lens": case.kv_lens, "attn_mask": case.attn_mask}


def run_row(
    cfg: BenchConfig,
    providers: dict[str, Provider],
    device: torch.device,
    *,
    ceilings: dict | None,
    reps: int = 50,
    warmup: int = 5,
    seed: int | None = None,
) -> dict:
    """Check every provider on a row, time the correct ones (GPU only), and compute floors and speed-ups.

    seed: inputs' seed (None: fresh draws; the seed used is recorded in the row).
    """
    seed = secrets.randbits(63) if seed is None else seed
    cases = row_cases(cfg, device, seed=seed)
    kv_lens = None if cases[0].kv_lens is None else cases[0].kv_lens.tolist()
    work = row_work(cfg, kv_lens)
    floor, bound = floor_us(work, ceilings)
    cells: dict[str, dict] = {}
    for name, provider in providers.items():
        ok, why = provider.supports(cfg, device)
        cells[name] = check_provider(provider, cases) if ok else {"status": "n/a", "reason": why}
    row = {
        "config": cfg.as_dict(),
        "label": cfg.label,
        "kv_lens": kv_lens,
        "seed": seed,
        "work": work,
        "floor_us": floor,
        "bound": bound,
        "providers": cells,
        "kernel": kernel_for(cfg),
    }
    if "optimizer" in providers:
        row["optimizer_decision"] = optimizer_decision(cfg, device)
    if device.type == "cuda":
        _time_row(row, providers, cases[0], reps=reps, warmup=warmup)
    del cases
    return row


def _time_row(
    row: dict, providers: dict[str, Provider], case: verify.Case, *, reps: int, warmup: int
) -> None:
    cells = row["providers"]
    calls = {}
    for name, cell in cells.items():
        if cell["status"] == "correct":
            try:
                calls[name] = providers[name].make_call(case.q, case.k, case.v, **_call_options(case))
                if getattr(calls[name], "note", None):
                    cell["note"] = calls[name].note
            except Exception as error:  # noqa: BLE001 - report it in the row, keep sweeping
                cell.update(
                    status="error", reason=f"preparing the call raised {type(error).__name__}: {error}"
                )
    if not calls:
        return
    samples = timing.time_interleaved(calls, reps=reps, warmup=warmup, cold_l2=True)
    for name, values in samples.items():
        summary = timing.summarize(values)
        cells[name].update(samples_us=values, **summary)
        if row["floor_us"]:
            cells[name]["pct_of_floor"] = 100 * row["floor_us"] / summary["median_us"]
    row["speedups"] = row_speedups(row, providers)
    if row["config"]["phase"] == "decode":
        _time_row_in_graph(row, providers, case)


def _time_row_in_graph(row: dict, providers: dict[str, Provider], case: verify.Case) -> None:
    """Decode rows, second method: per call inside a captured CUDA graph of GRAPH_LAYERS calls, each layer on
    its own q/k/v buffers (what a graph-captured decode loop sees; L2 does not hold the cache)."""
    need = GRAPH_LAYERS * row["work"]["bytes"]
    if need > GRAPH_MAX_BYTES:
        row["graph"] = f"skipped: {GRAPH_LAYERS} layers of buffers need {need / 2**30:.0f} GiB"
        return
    layers = [tuple(torch.randn_like(t) for t in (case.q, case.k, case.v)) for _ in range(GRAPH_LAYERS)]
    options = _call_options(case)
    for name in GRAPH_PROVIDERS:
        cell = row["providers"].get(name)
        if cell is None or "median_us" not in cell:
            continue
        make = providers[name].make_call
        try:
            samples = timing.time_graph_per_call(
                lambda i, make=make: make(*layers[i], **options), layers=GRAPH_LAYERS, reps=GRAPH_REPS
            )
        except Exception as error:  # noqa: BLE001 - a call that cannot be captured is reported, not fatal
            cell["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        summary = timing.summarize(samples)
        cell.update(
            graph_samples_us=samples, graph_median_us=summary["median_us"], graph_ci95_us=summary["ci95_us"]
        )
    row["graph"] = (
        f"CUDA graph of {GRAPH_LAYERS} calls on distinct buffers, {GRAPH_REPS} replays, per-call time"
    )
    row["graph_speedups"] = row_speedups(row, providers, key="graph_median_us")


def row_speedups(row: dict, providers: dict[str, Provider], key: str = "median_us") -> dict:
    """Per timed candidate: baseline time / candidate time (`key`) for each timed baseline and the best."""
    cells = row["providers"]
    timed = {name: cell[key] for name, cell in cells.items() if key in cell}
    baselines = {name: t for name, t in timed.items() if providers[name].role == "baseline"}
    result = {}
    for name, t in timed.items():
        if providers[name].role != "candidate" or name not in (row["kernel"], "optimizer"):
            continue
        speedups = {baseline: bt / t for baseline, bt in baselines.items()}
        if baselines:
            best = min(baselines, key=baselines.get)
            speedups["best-torch"] = baselines[best] / t
            speedups["best-torch-name"] = best
        result[name] = speedups
    return result


# ----------------------------------------------------------------------------------------------------------
# The sweep


def sweep_summary(rows: list[dict]) -> dict:
    """Per candidate ("attnforge" kernels, "optimizer") and baseline: speed-up statistics over the rows."""
    collected: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for method, suffix in (("speedups", ""), ("graph_speedups", " (CUDA graph)")):
            for name, speedups in row.get(method, {}).items():
                candidate = ("attnforge" if name.startswith("attnforge") else name) + suffix
                for baseline, value in speedups.items():
                    if baseline != "best-torch-name":
                        collected.setdefault(candidate, {}).setdefault(baseline, []).append(value)
    counts: dict[str, int] = {}
    for row in rows:
        for cell in row["providers"].values():
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
    incorrect = [
        {"row": row["label"], "provider": name, "reason": cell["reason"]}
        for row in rows
        for name, cell in row["providers"].items()
        if cell["status"] in ("incorrect", "error")
    ]
    return {
        "speedups": {
            candidate: {baseline: stats.speedup_summary(values) for baseline, values in by_baseline.items()}
            for candidate, by_baseline in collected.items()
        },
        "cells": counts,
        "incorrect": incorrect,
    }


def run_sweep(
    rows: Iterable[BenchConfig],
    *,
    providers: dict[str, Provider] | None = None,
    device: torch.device | str | None = None,
    reps: int = 50,
    warmup: int = 5,
    time_budget_s: float | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> dict:
    """Run rows and return the result document (environment, ceilings, rows, summary).

    On a CUDA device the ceilings are measured first and every correct provider is timed; elsewhere only
    correctness runs and `note` says that timings need a GPU. Rows past `time_budget_s` are listed as not run.
    """
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    providers = providers if providers is not None else default_providers()
    rows = list(rows)
    started = time.monotonic()
    ceilings = timing.ceilings() if device.type == "cuda" else None
    results, skipped = [], []
    for index, cfg in enumerate(rows):
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            skipped.append(cfg.label)
            continue
        if progress is not None:
            progress(index, cfg.label)
        results.append(run_row(cfg, providers, device, ceilings=ceilings, reps=reps, warmup=warmup))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "what": "kernels",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": report.run_environment(),
        "ceilings": ceilings,
        "method": _method(device, reps, warmup),
        "note": None if device.type == "cuda" else NO_GPU_NOTE,
        "providers": {name: {"role": p.role, "description": p.description} for name, p in providers.items()},
        "rows": results,
        "not_run": skipped,
        "summary": sweep_summary(results),
        "elapsed_s": time.monotonic() - started,
    }


def _method(device: torch.device, reps: int, warmup: int) -> str:
    if device.type != "cuda":
        return "correctness only: verify.check (random, needle, large-logit cases) against the float64 oracle"
    return (
        "correctness first (random, needle, large-logit cases vs the float64 oracle; incorrect rows are "
        f"never timed); then CUDA events around each call, {warmup} warm-up calls, {reps} samples per "
        "provider, "
        f"providers interleaved, L2 flushed (256 MiB write) before every sample; median and 95% interval of "
        "the median; floor = max(bytes / read bandwidth, FLOPs / bf16 rate), ceilings measured in this run"
    )
