"""What `attnforge tune` measures: `Target` (one representative call per tuning bucket) and the target lists
(a model's buckets, or a preset grid: decode-grid, decode-lens, prefill-grid)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnforge.bench import presets
from attnforge.bench.providers import DTYPES
from attnforge.config import AttentionConfig

# 8k: the accelerator's static cache at a 4k prompt (4k valid keys of a buffer in the 8k bucket).
MODEL_CONTEXTS = (1024, 4096, 8192, 16384)
MODEL_PROMPTS = (128, 512, 2048)


@dataclass(frozen=True)
class Target:
    """One call to tune: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`; `valid` = kv_lens (a static cache or a
    ragged batch: keys beyond them hold NaN/Inf), else every key is valid."""

    kind: str
    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    valid: tuple[int, ...] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def attention_config(self) -> AttentionConfig:
        """The call (causal: decode and prefill alike are bottom-right causal)."""
        sizes = (self.batch, self.num_heads, self.num_kv_heads, self.q_len, self.kv_len, self.head_dim)
        return AttentionConfig.from_sizes(*sizes, dtype=self.torch_dtype, causal=True)

    @property
    def label(self) -> str:
        lens = "" if self.valid is None else f" valid={_lens_text(self.valid)}"
        return (f"{self.kind} B={self.batch} {self.num_heads}:{self.num_kv_heads} Lq={self.q_len} "
                f"Lkv={self.kv_len} d{self.head_dim} {self.dtype}{lens}")  # fmt: skip

    @property
    def bucket(self) -> str:
        if self.kind == "decode":
            from attnforge.kernels.decode_params import decode_bucket

            group = self.num_heads // self.num_kv_heads
            lens = self.valid is not None
            return decode_bucket(self.batch, self.kv_len, group, self.q_len, self.head_dim, lens)
        from attnforge.kernels.prefill import prefill_bucket

        return prefill_bucket(self.batch, self.num_heads, self.q_len, self.kv_len, self.head_dim,
                              self.torch_dtype, self.valid is not None)  # fmt: skip


def _lens_text(lens: tuple[int, ...]) -> str:
    return str(lens[0]) if len(set(lens)) == 1 else f"{min(lens)}..{max(lens)}"


def model_targets(model: str, *, batch: int = 1, contexts=MODEL_CONTEXTS, prompts=MODEL_PROMPTS,
                  kinds=("decode", "prefill"), dtype: str = "bfloat16") -> list[Target]:  # fmt: skip
    """The buckets a model's generation hits: decode against a DynamicCache (every key valid) and against a
    static cache (half of a buffer valid) at each context length, and prefill of each prompt length."""
    from attnforge.models import load_config

    config = load_config(model)
    config = getattr(config, "get_text_config", lambda: config)()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (batch, heads, kv_heads)
    targets = []
    if "decode" in kinds:
        for n in contexts:
            targets.append(Target("decode", *shape, 1, n, head_dim, dtype))
            targets.append(Target("decode", *shape, 1, n, head_dim, dtype, valid=(n // 2,) * batch))
    if "prefill" in kinds:
        targets += [Target("prefill", *shape, n, n, head_dim, dtype) for n in prompts]
    return targets


def decode_grid() -> list[Target]:
    """Issue 10's grid: B1 GQA 16:8 / 32:8 / 40:8 d128 at 1k-64k; MQA, MHA; d64, d80, d256; B8, B32; Lq 2-16;
    a static cache (4k valid in a 32k buffer) and a ragged batch (B8, 1k..16k valid in 16k)."""
    rows = [Target("decode", 1, h, 8, 1, n, 128) for h in (16, 32, 40) for n in (1024, 4096, 16384, 65536)]
    rows += [Target("decode", 1, h, kv, 1, n, 128) for h, kv in ((32, 1), (32, 32)) for n in (4096, 16384)]
    rows += [Target("decode", 1, 32, 8, 1, 4096, d) for d in (64, 80, 256)]
    rows += [Target("decode", 1, 32, 32, 1, 4096, 64), Target("decode", 1, 32, 1, 1, 4096, 64)]
    rows += [Target("decode", b, 32, 8, 1, n, 128) for b in (8, 32) for n in (4096, 16384)]
    rows += [Target("decode", 1, 32, 8, q, 4096, 128) for q in (2, 4, 8, 16)]
    rows.append(Target("decode", 1, 32, 8, 1, 32768, 128, valid=(4096,)))
    rows.append(Target("decode", 8, 32, 8, 1, 16384, 128, valid=tuple(1024 + 2048 * i for i in range(8))))
    return rows


def decode_lens_grid() -> list[Target]:
    """The rows of the decode grid that read a cache through valid lengths or take several new tokens."""
    return [t for t in decode_grid() if t.valid is not None or t.q_len > 1]


def prefill_grid() -> list[Target]:
    """The causal and chunked rows of `attnforge bench kernels --preset prefill` (issue 14) as targets."""
    rows = [c for c in presets.prefill_grid() if not c.padded]
    return [
        Target("prefill", c.batch, c.num_heads, c.num_kv_heads, c.q_len, c.kv_len, c.head_dim) for c in rows
    ]


PRESETS: dict[str, Callable[[], list[Target]]] = {
    "decode-grid": decode_grid,
    "decode-lens": decode_lens_grid,
    "prefill-grid": prefill_grid,
}
