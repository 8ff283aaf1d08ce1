"""The rows and providers of `attnforge bench kernels --preset decode|prefill|grid|sweep`.

Every preset has GPU sizes and tiny float32 CPU sizes (correctness only, Triton under TRITON_INTERPRET=1):
- decode: batch-1/8 GQA decode at KV 512..128k, GQA ratios, ragged caches, a few new tokens, d64/d80, fp16.
- prefill: issue 14's grid: causal GQA 32:8 / 16:8 d128 and MHA 32:32 d64 at 512..16k (16k tokens a row),
  chunked prefill against a cache, padded batches of prompts (q_lens = kv_lens), against every torch path.
- grid: the whole mixed grid (decode, prefill, masks, dtypes, ratios; the main series first).
- sweep: attnforge's prefill kernel at fixed launch parameters on a few rows, against torch (read-only:
  `attnforge tune --preset prefill-grid` is what measures and stores tuning entries).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from attnforge.bench.providers import BenchConfig, Provider, default_providers

PRESETS = ("decode", "prefill", "grid", "sweep")
GQA_SHAPES = [(32, 32), (32, 16), (32, 8), (40, 8), (64, 8), (32, 1)]  # ratios 1, 2, 4, 5, 8 and MQA
PREFILL_HEADS = ((32, 8, 128), (16, 8, 128), (32, 32, 64))  # (Hq, Hkv, D): issue 14's targets
PREFILL_TOKENS = 16384  # causal prefill rows hold this many tokens: batch = 16384 // L
SWEEP_BASELINES = ("attnforge-prefill", "sdpa-auto", "sdpa-flash", "sdpa-cudnn", "sdpa-lower-right")


def _decode(batch, heads, kv_heads, kv_len, head_dim=128, **options) -> BenchConfig:
    return BenchConfig(batch, heads, kv_heads, options.pop("q_len", 1), kv_len, head_dim, **options)


def _prefill(batch, heads, kv_heads, length, head_dim=128, **options) -> BenchConfig:
    q_len = options.pop("q_len", length)
    return BenchConfig(batch, heads, kv_heads, q_len, length, head_dim, **options)


# ----------------------------------------------------------------------------------------------------------
# GPU sizes


def decode_grid() -> list[BenchConfig]:
    """Decode rows: B1 GQA 32:8 d128 at KV 512..128k first; then B8, GQA ratios, ragged caches, Lq 4,
    d64/80, fp16."""
    rows = [_decode(1, 32, 8, n) for n in (512, 1024, 4096, 16384, 65536, 131072)]
    rows += [_decode(8, 32, 8, n) for n in (1024, 4096, 16384, 65536)]
    rows += [_decode(1, h, kv, n) for n in (4096, 16384) for h, kv in GQA_SHAPES if (h, kv) != (32, 8)]
    rows += [_decode(8, 32, 8, 4096, ragged=True), _decode(8, 32, 8, 16384, ragged=True)]
    rows += [_decode(1, 32, 8, 4096, q_len=4)]
    rows += [_decode(1, 32, 8, 4096, head_dim=d) for d in (64, 80)]
    return rows + [_decode(1, 32, 8, 4096, dtype="float16")]


def prefill_grid() -> list[BenchConfig]:
    """Issue 14's grid: causal GQA 32:8 d128 at 512..16k first (batch 16k // L), chunked prefill (512 / 2k new
    tokens against 4k / 16k / 32k cached), padded batches (B8 up to 2k, B16 up to 1k), then 16:8 d128 and
    32:32 d64."""
    lengths = (512, 1024, 2048, 4096, 8192, 16384)
    causal = {heads: [_prefill(PREFILL_TOKENS // n, *heads[:2], n, heads[2]) for n in lengths]
              for heads in PREFILL_HEADS}  # fmt: skip
    chunked = [_prefill(1, 32, 8, cached + new, q_len=new) for new, cached in
               itertools.product((512, 2048), (4096, 16384, 32768))]  # fmt: skip
    padded = [_prefill(8, 32, 8, 2048, padded=True), _prefill(16, 32, 8, 1024, padded=True)]
    rest = [row for heads in PREFILL_HEADS[1:] for row in causal[heads]]
    return causal[PREFILL_HEADS[0]] + chunked + padded + rest


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
    rows += [_prefill(8, 32, 8, 1024, padded=True)]
    rows += [_decode(1, 32, 8, 4096, q_len=4), _prefill(1, 32, 8, 4096, q_len=512)]
    rows += [_decode(1, 32, 8, 4096, head_dim=d) for d in (64, 80)]
    rows += [_prefill(1, 32, 8, 2048, head_dim=d) for d in (64, 80)]
    rows += [_decode(1, 32, 8, 4096, dtype="float16"), _prefill(1, 32, 8, 2048, dtype="float16")]
    return rows


def sweep_grid() -> list[BenchConfig]:
    """The rows the launch-parameter comparison times (a causal 2k and 8k, d64 MHA, a chunk against 16k)."""
    return [_prefill(8, 32, 8, 2048), _prefill(2, 32, 8, 8192), _prefill(4, 32, 32, 4096, head_dim=64),
            _prefill(1, 32, 8, 16384 + 512, q_len=512)]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# CPU sizes: float32, d64 (one d128), a few tokens; every row kind of the GPU grid


def _cpu(row: Callable[..., BenchConfig], *args, **options) -> BenchConfig:
    return row(*args, **{"head_dim": 64, "dtype": "float32", **options})


def cpu_decode_grid() -> list[BenchConfig]:
    rows = [_cpu(_decode, 1, 4, 2, n) for n in (1, 65, 300)]
    rows += [_cpu(_decode, 2, 4, 1, 130, ragged=True), _cpu(_decode, 1, 4, 2, 63, q_len=3)]
    return rows


def cpu_prefill_grid() -> list[BenchConfig]:
    """Causal GQA (d128 and d64), MHA, a chunk against a cache, a padded batch of prompts."""
    rows = [_cpu(_prefill, 1, 4, 2, 40, head_dim=128), _cpu(_prefill, 1, 4, 4, 33)]
    rows += [_cpu(_prefill, 1, 4, 2, 80, q_len=24), _cpu(_prefill, 2, 4, 2, 40, padded=True)]
    return rows


def cpu_grid() -> list[BenchConfig]:
    """Tiny float32 shapes of every kind (decode, prefill, masks, lengths) for the CPU."""
    rows = cpu_decode_grid() + [_cpu(_prefill, 1, 4, 2, 65)]
    rows += [_cpu(_prefill, 1, 4, 4, 40, mask=m) for m in ("none", "bool", "additive")]
    rows += [_cpu(_prefill, 2, 4, 2, 70, q_len=33, ragged=True), _cpu(_prefill, 2, 4, 2, 40, padded=True)]
    return rows


def cpu_sweep_grid() -> list[BenchConfig]:
    return [_cpu(_prefill, 1, 4, 2, 70), _cpu(_prefill, 1, 4, 2, 80, q_len=24)]


GRIDS: dict[str, tuple[Callable[[], list[BenchConfig]], Callable[[], list[BenchConfig]]]] = {
    "decode": (decode_grid, cpu_decode_grid),
    "prefill": (prefill_grid, cpu_prefill_grid),
    "grid": (full_grid, cpu_grid),
    "sweep": (sweep_grid, cpu_sweep_grid),
}


def build_grid(preset: str, *, on_gpu: bool = True) -> list[BenchConfig]:
    """The rows of `preset` ("decode", "prefill", "grid", "sweep") at GPU sizes, or tiny CPU ones."""
    if preset not in GRIDS:
        raise ValueError(f"preset={preset!r} is not known; accepted: {list(PRESETS)}")
    gpu, cpu = GRIDS[preset]
    return gpu() if on_gpu else cpu()


def preset_providers(preset: str) -> dict[str, Provider]:
    """The providers a preset measures: every registered one; `sweep` adds attnforge's prefill kernel at each
    fixed launch-parameter set and keeps only the kernel's own choice and torch's SDPA among the rest."""
    providers = default_providers()
    if preset != "sweep":
        return providers
    from attnforge.bench.prefill_providers import launch_providers

    chosen = {name: providers[name] for name in SWEEP_BASELINES}
    return chosen | {p.name: p for p in launch_providers()}
