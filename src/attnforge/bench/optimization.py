"""`benchmark_optimization`: the optimizer's attention against torch SDPA on one model's attention shapes.

For each sequence length, two calls shaped like the model's layers: a causal prefill of that many tokens and a
decode step against a cache of that length (batch 1). Each is checked first (correctness protocol) and timed
only when correct, with the kernel sweep's machinery (kernels.run_row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnforge.bench import kernels, report
from attnforge.bench.providers import BenchConfig, default_providers, kernel_for

BASELINE = "sdpa-auto"


@dataclass
class BenchmarkResult:
    """One (sequence length, phase) of `benchmark_optimization`.

    speedup: baseline median / optimizer median (None when not timed: no GPU, or a side was incorrect).
    """

    model: str
    seq_length: int
    phase: str
    config: dict
    baseline: str
    baseline_us: float | None
    optimized_us: float | None
    speedup: float | None
    kernel_us: float | None
    kernel_speedup: float | None
    correct: bool
    optimizer_decision: str
    note: str = ""
    cells: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def _attention_shape(model_name: str) -> tuple[int, int, int]:
    from attnforge.models import load_config

    config = load_config(model_name)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _result(model_name: str, length: int, cfg: BenchConfig, row: dict) -> BenchmarkResult:
    cells = row["providers"]
    kernel_name = kernel_for(cfg)
    baseline, optimized, kernel = cells[BASELINE], cells["optimizer"], cells.get(kernel_name, {})
    speedups = row.get("speedups", {})
    correct = optimized["status"] == "correct"
    note = ""
    if "median_us" not in optimized:
        note = kernels.NO_GPU_NOTE if row["floor_us"] is None else f"optimizer {optimized['status']}"
        if not correct:
            note = f"optimizer {optimized['status']}: {optimized.get('reason', '')}"
    return BenchmarkResult(
        model=model_name,
        seq_length=length,
        phase=cfg.phase,
        config=cfg.as_dict(),
        baseline=BASELINE,
        baseline_us=baseline.get("median_us"),
        optimized_us=optimized.get("median_us"),
        speedup=speedups.get("optimizer", {}).get(BASELINE),
        kernel_us=kernel.get("median_us"),
        kernel_speedup=speedups.get(kernel_name, {}).get(BASELINE),
        correct=correct,
        optimizer_decision=row.get("optimizer_decision", ""),
        note=note,
        cells=cells,
    )


def benchmark_optimization(
    model_name: str = "qwen3-0.6b",
    seq_lengths: list[int] | tuple[int, ...] = (256, 512, 1024, 2048),
    warmup_runs: int = 3,
    benchmark_runs: int = 10,
    save_results: bool = True,
    *,
    out_dir: Path | str | None = None,
    device: torch.device | str | None = None,
) -> list[BenchmarkResult]:
    """Time the optimizer's attention against torch SDPA on `model_name`'s attention shapes.

    Args:
        model_name: a bundled architecture (e.g. "qwen3-0.6b", "llama3-8b") or a hub id / local path.
        seq_lengths: prompt lengths (prefill) and cache lengths (decode), positive integers.
        warmup_runs, benchmark_runs: untimed and timed calls per provider (GPU only).
        save_results: write `kernels-optimization-<model>-<date>.json/.csv/.md` under `out_dir`
            (default: `$ATTNFORGE_CACHE_DIR` or `~/.cache/attnforge`, then `results/<gpu>`).

    Returns:
        One BenchmarkResult per (sequence length, phase), prefill then decode; `.speedup` is None without a
        GPU (correctness only) and `.note` says why.
    """
    lengths = list(seq_lengths)
    _check_arguments(lengths, seq_lengths, warmup_runs, benchmark_runs)
    device = _pick_device(device)
    configs = _configs(model_name, lengths, "bfloat16" if device.type == "cuda" else "float32")
    chosen_rows = [cfg for _, cfg in configs]
    names = {"optimizer", BASELINE, *(kernel_for(cfg) for cfg in chosen_rows)}
    providers = {name: p for name, p in default_providers().items() if name in names}
    doc = kernels.run_sweep(
        chosen_rows, providers=providers, device=device, reps=benchmark_runs, warmup=warmup_runs
    )
    results = [
        _result(model_name, length, cfg, row) for (length, cfg), row in zip(configs, doc["rows"], strict=True)
    ]
    if save_results:
        _save(doc, model_name, out_dir, device)
    return results


def _check_arguments(lengths: list, seq_lengths, warmup_runs, benchmark_runs) -> None:
    bad = [n for n in lengths if not isinstance(n, int) or isinstance(n, bool) or n <= 0]
    if not lengths or bad:
        raise ValueError(
            f"seq_lengths={seq_lengths!r} must be a non-empty list of positive integers (bad: {bad})"
        )
    if not isinstance(warmup_runs, int) or warmup_runs < 0:
        raise ValueError(f"warmup_runs={warmup_runs!r} must be an integer >= 0")
    if not isinstance(benchmark_runs, int) or benchmark_runs < 1:
        raise ValueError(f"benchmark_runs={benchmark_runs!r} must be an integer >= 1")


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _configs(model_name: str, lengths: list[int], dtype: str) -> list[tuple[int, BenchConfig]]:
    """(length, config) per length: the prefill call (Lq = Lkv = length), then the decode call (Lq = 1)."""
    heads, kv_heads, head_dim = _attention_shape(model_name)
    configs = []
    for length in lengths:
        configs.append((length, BenchConfig(1, heads, kv_heads, length, length, head_dim, dtype=dtype)))
        configs.append((length, BenchConfig(1, heads, kv_heads, 1, length, head_dim, dtype=dtype)))
    return configs


def _save(doc: dict, model_name: str, out_dir: Path | str | None, device: torch.device) -> None:
    """Under out_dir, by default the user's cache (never the source tree): `<cache>/results/<gpu>`."""
    from attnforge.kernels.tuning import gpu_key
    from attnforge.models import cache_dir

    out = Path(out_dir) if out_dir is not None else cache_dir() / "results" / gpu_key(device)
    doc["model"] = model_name
    report.save(doc, out, report.default_stem("kernels", f"optimization-{model_name}"))
