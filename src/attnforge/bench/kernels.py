"""The kernel sweep: every provider on a grid of attention shapes, correctness before timing.

For each row (`BenchConfig`, from a preset in bench/presets.py): draw inputs, check every provider with the
correctness protocol (random, needle and large-logit cases at the row's exact shape, NaN/Inf in the padding
beyond per-sequence lengths, against the float64 oracle); a provider that fails is reported
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
        queries = None if case.q_lens is None else case.q_lens[b : b + 1]
        visible = reference.visibility_mask(
            1, q_len, kv_len, causal=case.causal, kv_lens=lens, q_lens=queries, device=q.device
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
        if queries is not None:  # padded query rows are 0 (the oracle's convention)
            out[b, :, int(queries[0]) :] = 0
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
    shape = cfg.attention_config()
    kv_lens = q_lens = None
    if cfg.ragged:
        low = cfg.q_len
        kv_lens = torch.randint(low, cfg.kv_len + 1, (cfg.batch,), generator=generator)
        kv_lens[0] = max(low, cfg.kv_len // 3)
        kv_lens = kv_lens.to(device=device, dtype=torch.int32)
    if cfg.padded:  # prompts of 1/8 to all of Lq, the first one full (it sets the padded length)
        q_lens = torch.randint(max(1, cfg.q_len // 8), cfg.q_len + 1, (cfg.batch,), generator=generator)
        q_lens[0] = cfg.q_len
        q_lens = kv_lens = q_lens.to(device=device, dtype=torch.int32)
    mask = _row_mask(cfg, device, generator)
    options = {"device": device, "kv_lens": kv_lens, "generator": generator}
    # Padded prompts: the last key every valid query sees is key 0 (the needle helper knows no q_lens).
    needle_options = {**options, "kv_lens": None} if cfg.padded else options
    makers = {
        "random": lambda: verify.random_case(shape, **options),
        "needle": lambda: verify.needle_case(shape, position="last", **needle_options),
        "large": lambda: verify.large_logits_case(shape, **options),
    }
    unknown = set(kinds) - set(makers)
    if unknown:
        raise ValueError(f"unknown check kinds {sorted(unknown)}; accepted: {sorted(makers)}")
    cases = []
    for kind in kinds:
        case = makers[kind]()
        case.attn_mask, case.q_lens, case.kv_lens = mask, q_lens, kv_lens
        _poison_padding(case)
        fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(verify.Case)}
        cases.append(_ChunkedCase(**fields))
    return cases


def _poison_padding(case: verify.Case) -> None:
    """NaN and +Inf in k/v beyond `kv_lens` (the protocol's poisoned padding): they must not matter. Torch's
    masked paths, which read those keys, get a zeroed copy outside the timed call (providers.zero_padding)."""
    if case.kv_lens is None:
        return
    for b, end in enumerate(case.kv_lens.tolist()):
        for t in (case.k, case.v):
            t[b, :, end::2] = math.nan
            t[b, :, end + 1 :: 2] = math.inf


# ----------------------------------------------------------------------------------------------------------
# Floors


def visible_pairs(cfg: BenchConfig, kv_lens: list[int] | None = None, q_lens: list[int] | None = None) -> int:
    """Query-key pairs a kernel must compute: all valid keys, or the bottom-right causal triangle (valid
    queries only: `q_lens[b]` of a padded batch)."""
    total = 0
    ends = kv_lens or [cfg.kv_len] * cfg.batch
    for end, queries in zip(ends, q_lens or [cfg.q_len] * cfg.batch, strict=True):
        if cfg.causal:
            first = end - queries  # query i sees keys 0 .. first + i
            total += sum(max(0, min(end, first + i + 1)) for i in range(queries))
        else:
            total += queries * end
    return total


def row_work(cfg: BenchConfig, kv_lens: list[int] | None = None, q_lens: list[int] | None = None) -> dict:
    """Bytes a kernel must move (q, valid k and v, out) and FLOPs it must do (QK^T and PV: 4 * D per visible
    query-key pair, so causal is about half of the square)."""
    element = torch.empty((), dtype=cfg.torch_dtype).element_size()
    valid_keys = sum(kv_lens) if kv_lens else cfg.batch * cfg.kv_len
    queries = sum(q_lens) if q_lens else cfg.batch * cfg.q_len
    q_bytes = cfg.num_heads * queries * cfg.head_dim * element
    kv_bytes = 2 * cfg.num_kv_heads * valid_keys * cfg.head_dim * element
    flops = 4 * cfg.num_heads * cfg.head_dim * visible_pairs(cfg, kv_lens, q_lens)
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
    options = {
        "causal": case.causal,
        "scale": case.scale,
        "kv_lens": case.kv_lens,
        "attn_mask": case.attn_mask,
    }
    return options if case.q_lens is None else {**options, "q_lens": case.q_lens}


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
    q_lens = None if cases[0].q_lens is None else cases[0].q_lens.tolist()
    work = row_work(cfg, kv_lens, q_lens)
    floor, bound = floor_us(work, ceilings)
    cells: dict[str, dict] = {}
    for name, provider in providers.items():
        ok, why = provider.supports(cfg, device)
        cells[name] = check_provider(provider, cases) if ok else {"status": "n/a", "reason": why}
    row = {
        "config": cfg.as_dict(),
        "label": cfg.label,
        "kv_lens": kv_lens,
        "q_lens": q_lens,
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
        if row["config"]["phase"] == "prefill":  # compute-bound: TFLOP/s (4 * D per visible pair)
            cells[name]["tflops"] = row["work"]["flops"] / (summary["median_us"] * 1e-6) / 1e12
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
        if providers[name].role != "candidate" or not (name == "optimizer" or name.startswith(row["kernel"])):
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
                candidate = ("attnforge" if name == row["kernel"] else name) + suffix
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
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run rows and return the result document (environment, ceilings, rows, summary).

    On a CUDA device the ceilings are measured first and every correct provider is timed; elsewhere only
    correctness runs and `note` says that timings need a GPU. Rows past `time_budget_s` are listed as not run.
    checkpoint: called with the document so far after every row (a run cut short keeps what it measured).
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

    def document() -> dict:
        return {
            "what": "kernels",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": report.run_environment(),
            "ceilings": ceilings,
            "method": _method(device, reps, warmup),
            "note": None if device.type == "cuda" else NO_GPU_NOTE,
            "providers": {
                name: {"role": p.role, "description": p.description} for name, p in providers.items()
            },
            "rows": results,
            "not_run": skipped + [cfg.label for cfg in rows[len(results) + len(skipped) :]],
            "summary": sweep_summary(results),
            "elapsed_s": time.monotonic() - started,
        }

    for index, cfg in enumerate(rows):
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            skipped.append(cfg.label)
            continue
        if progress is not None:
            progress(index, cfg.label)
        results.append(run_row(cfg, providers, device, ceilings=ceilings, reps=reps, warmup=warmup))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(document())
    return document()


def _method(device: torch.device, reps: int, warmup: int) -> str:
    if device.type != "cuda":
        return "correctness only: verify.check (random, needle, large-logit cases) against the float64 oracle"
    return (
        "correctness first (random, needle, large-logit cases vs the float64 oracle; incorrect rows are "
        f"never timed); then CUDA events around each call, {warmup} warm-up calls, {reps} samples per "
        "provider, providers interleaved, L2 flushed (256 MiB read: no dirty lines left to write back) "
        "before every sample; median and 95% interval of "
        "the median; floor = max(bytes / read bandwidth, FLOPs / bf16 rate), ceilings measured in this run"
    )
