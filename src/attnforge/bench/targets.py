"""What `attnforge tune` measures: `Target` (one representative call per tuning bucket), the target lists
(a model's buckets, or a preset grid: decode-grid, decode-lens, prefill-grid), and each target's inputs and
calls: the needle case, the kernel's launch, torch's paths for the same call, the check against the oracle."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnforge import verify
from attnforge.bench import presets
from attnforge.bench.providers import DTYPES, BenchConfig, zero_padded_rows
from attnforge.config import AttentionConfig

# 8k: the accelerator's static cache at a 4k prompt (4k valid keys of a buffer in the 8k bucket).
MODEL_CONTEXTS = (1024, 4096, 8192, 16384)
MODEL_PROMPTS = (128, 512, 2048)


@dataclass(frozen=True)
class Target:
    """One call to tune: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`; `valid` = kv_lens (a static cache or a
    ragged batch: keys beyond them hold NaN/Inf), else every key is valid; `padded`: a padded batch of prompts
    (Lq == Lkv), whose lengths (q_lens = kv_lens) the case draws as `attnforge bench kernels` does."""

    kind: str
    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    valid: tuple[int, ...] | None = None
    padded: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def attention_config(self) -> AttentionConfig:
        """The call (causal: decode and prefill alike are bottom-right causal)."""
        sizes = (self.batch, self.num_heads, self.num_kv_heads, self.q_len, self.kv_len, self.head_dim)
        return AttentionConfig.from_sizes(*sizes, dtype=self.torch_dtype, causal=True)

    @property
    def label(self) -> str:
        lens = " padded" if self.padded else "" if self.valid is None else f" valid={_lens_text(self.valid)}"
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

        lens = self.valid is not None or self.padded
        return prefill_bucket(self.batch, self.num_heads, self.q_len, self.kv_len, self.head_dim,
                              self.torch_dtype, lens, self.padded)  # fmt: skip


def _lens_text(lens: tuple[int, ...]) -> str:
    return str(lens[0]) if len(set(lens)) == 1 else f"{min(lens)}..{max(lens)}"


def model_targets(model: str, *, batch: int = 1, contexts=MODEL_CONTEXTS, prompts=MODEL_PROMPTS,
                  kinds=("decode", "prefill"), dtype: str = "bfloat16") -> list[Target]:  # fmt: skip
    """The buckets a model's generation hits: decode against a DynamicCache (every key valid) and against a
    static cache at each context length (half of the buffer valid; a batch's sequences ragged as the
    accelerator's batches are, 1/B to all of that half: most fit in a few tiles), and prefill of each prompt
    length."""
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
            valid = tuple(max(1, n * (i + 1) // (2 * batch)) for i in range(batch))
            targets.append(Target("decode", *shape, 1, n, head_dim, dtype, valid=valid))
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
    """The rows of `attnforge bench kernels --preset prefill` (issue 14) as targets: causal, chunked against a
    cache, padded batches of prompts."""
    return [
        Target(
            "prefill", c.batch, c.num_heads, c.num_kv_heads, c.q_len, c.kv_len, c.head_dim, padded=c.padded
        )
        for c in presets.prefill_grid()
    ]


PRESETS: dict[str, Callable[[], list[Target]]] = {
    "decode-grid": decode_grid,
    "decode-lens": decode_lens_grid,
    "prefill-grid": prefill_grid,
}


# ----------------------------------------------------------------------------------------------------------
# Inputs, calls, correctness


def make_case(target: Target, device, seed: int) -> verify.Case:
    """The target's needle case (the needle at the last visible key); keys beyond `valid` are NaN/Inf. A
    padded batch: `attnforge bench kernels`' needle case of the row (lengths drawn from `seed`, the padding
    poisoned)."""
    if target.padded:
        from attnforge.bench.kernels import row_cases

        t = target
        sizes = (t.batch, t.num_heads, t.num_kv_heads, t.q_len, t.kv_len, t.head_dim)
        row = BenchConfig(*sizes, dtype=t.dtype, padded=True)
        return row_cases(row, device, seed=seed, kinds=("needle",))[0]
    generator = torch.Generator().manual_seed(seed)
    lens = None if target.valid is None else list(target.valid)
    case = verify.needle_case(target.attention_config(), position="last", device=device, kv_lens=lens,
                              generator=generator)  # fmt: skip
    if case.kv_lens is not None:
        for b, end in enumerate(case.kv_lens.tolist()):
            case.k[b, :, end:] = math.nan
            case.v[b, :, end:] = math.inf
    return case


def without_poison(case: verify.Case) -> verify.Case:
    """The case with zeros beyond the valid lengths, as a real static cache holds (torch's masked paths read
    those keys, so NaN there would poison them); the same case when every key is valid."""
    if case.kv_lens is None:
        return case
    k, v = case.k.clone(), case.v.clone()
    for b, end in enumerate(case.kv_lens.tolist()):
        k[b, :, end:] = 0
        v[b, :, end:] = 0
    return dataclasses.replace(case, k=k, v=v)


def zero_case(target: Target, device) -> verify.Case:
    """Zeros of the target's shapes, with lengths where it has them (what compilation needs)."""
    dtype = target.torch_dtype
    q = torch.zeros(target.batch, target.num_heads, target.q_len, target.head_dim, dtype=dtype, device=device)
    kv = (target.batch, target.num_kv_heads, target.kv_len, target.head_dim)
    k, v = torch.zeros(kv, dtype=dtype, device=device), torch.zeros(kv, dtype=dtype, device=device)
    lens = None if target.valid is None else torch.tensor(target.valid, dtype=torch.int32, device=device)
    q_lens = None
    if target.padded:  # every prompt full: compilation sees that lengths exist, not their values
        lens = q_lens = torch.full((target.batch,), target.q_len, dtype=torch.int32, device=device)
    return verify.Case("zeros", q, k, v, causal=True, kv_lens=lens, q_lens=q_lens)


def kernel_call(target: Target, case: verify.Case, params: dict, out: torch.Tensor) -> Callable[[], object]:
    """A zero-argument launch of the kernel with these launch parameters, writing `out`."""
    scale = target.head_dim**-0.5
    if target.kind == "decode":
        from attnforge.kernels.decode import launch_decode

        return lambda: launch_decode(case.q, case.k, case.v, out, scale=scale, kv_lens=case.kv_lens,
                                     params=params)  # fmt: skip
    from attnforge.kernels.prefill import _prefill_into, gluon_supported, warp_spec_supported

    lens = (case.kv_lens, case.q_lens)
    if params.get("ws") and not warp_spec_supported(case.q, case.k, case.v, None, params):
        raise ValueError(
            "the warp-specialized launch cannot take this call or these tiles (it would run the heuristic's)"
        )
    if params.get("gluon") and not gluon_supported(case.q, case.k, case.v, None, params):
        raise ValueError(
            "the Gluon launch cannot take this call or this schedule (it would run the heuristic's)"
        )
    return lambda: _prefill_into(case.q, case.k, case.v, out, scale, True, *lens, None, params)


def torch_calls(case: verify.Case) -> dict[str, Callable[[], object]]:
    """torch's paths for the same call: SDPA with enable_gqa (torch's own backend choice, masked where the
    call needs a mask), transformers' sdpa path (K/V repeated per call), and the bench's other torch paths
    where they serve the call (`prefill_providers`: bottom-right causal for a chunk against a cache, flash
    once per sequence and torch's varlen API for a padded batch); masks are built outside. A call may return
    its own layout (`unpack`) and leave padded query rows undefined: `check` takes care of both."""
    from attnforge.bench.prefill_providers import prefill_baselines
    from attnforge.bench.providers import repeat_kv_call, sdpa_call

    q, k, v = case.q, case.k, case.v
    options = dict(causal=case.causal, scale=case.scale, kv_lens=case.kv_lens, q_lens=case.q_lens)
    calls = {
        "sdpa-gqa": sdpa_call(None)(q, k, v, **options),
        "hf-repeat_kv": repeat_kv_call(q, k, v, **options),
    }
    row = _bench_row(case)
    for provider in prefill_baselines():
        if provider.role == "baseline" and provider.supports(row, q.device)[0]:
            calls[provider.name] = provider.make_call(q, k, v, **options)
    return calls


def _bench_row(case: verify.Case) -> BenchConfig:
    """The case's call as a bench row (what the bench's providers say they support)."""
    (batch, heads, q_len, head_dim), (kv_heads, kv_len) = case.q.shape, case.k.shape[1:3]
    dtype = next(name for name, value in DTYPES.items() if value == case.q.dtype)
    padded = case.q_lens is not None
    mask, ragged = "causal" if case.causal else "none", case.kv_lens is not None and not padded
    return BenchConfig(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype=dtype, mask=mask, ragged=ragged,
                       padded=padded)  # fmt: skip


def check(call: Callable[[], object], out: torch.Tensor, expected: torch.Tensor, dtype, padded_rows=None):
    """Run a call into a NaN-filled `out`; (passed, max per-slice relative L2 against `expected`). A call's
    own layout is unpacked; `padded_rows` (q_lens: torch's calls leave those rows undefined) are zeroed as
    attnforge writes them."""
    out.fill_(math.nan)
    result = call()
    result = out if result is None else result
    if getattr(call, "unpack", None) is not None:
        result = call.unpack(result)
    if padded_rows is not None:
        result = zero_padded_rows(result, padded_rows)
    if not torch.isfinite(result).all():
        return False, math.inf
    error = float(verify.relative_l2_per_slice(result, expected).max())
    return error <= verify.tolerance_for(dtype), error
