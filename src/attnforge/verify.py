"""The correctness protocol (DESIGN.md), shared by tests, benchmarks and the evolutionary evaluator.

- `reference_attention`: the float64 oracle (GQA by reshaping queries, bottom-right causal, kv_lens, q_lens,
  bool and additive masks; fully masked rows are 0).
- Case generators: random, needle, large-magnitude logits, NaN/Inf-poisoned padding beyond kv_lens, strided
  (non-contiguous) views; `protocol_cases` builds the whole set for one call (an AttentionConfig: sizes,
  dtype, causal).
- `check(fn, case) -> Report`: NaN-prefilled output, per-(batch, head) relative L2 against the oracle,
  tolerance keyed by dtype. NaN never passes. `judge(case, output)`: the same verdict on an output computed
  elsewhere (the evolve evaluator judges outputs sent back by the candidate's process).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from attnforge.config import AttentionConfig, check_qkv

# Max per-slice relative L2 error that passes, by the dtype of the inputs.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# fp32 inputs multiplied on tensor cores in tf32.
TF32_TOLERANCE = 1e-3
# Lengths that catch off-by-one block handling.
ODD_LENGTHS = (1, 7, 63, 65, 1000, 4097)
CASE_KINDS = ("random", "needle", "large", "poisoned", "strided")


# ----------------------------------------------------------------------------------------------------------
# The oracle


def _valid_lengths(lens: torch.Tensor | None, full: int, batch: int, name: str, device) -> torch.Tensor:
    if lens is None:
        return torch.full((batch,), full, dtype=torch.int64, device=device)
    if lens.shape != (batch,):
        raise ValueError(f"{name} must have shape [B]=({batch},), got {tuple(lens.shape)}")
    if lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lens.dtype}")
    lens = lens.to(device=device, dtype=torch.int64)
    if bool((lens < 0).any()) or bool((lens > full).any()):
        raise ValueError(f"{name} values must lie in [0, {full}], got {lens.tolist()}")
    return lens


def _expand_mask(
    attn_mask: torch.Tensor, batch: int, num_heads: int, q_len: int, kv_len: int
) -> torch.Tensor:
    target = (batch, num_heads, q_len, kv_len)
    try:
        return attn_mask.expand(target)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lkv]={target}"
        ) from None


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in float64: the oracle every kernel is checked against.

    Args:
        q: `[B, Hq, Lq, D]`; k, v: `[B, Hkv, Lkv, D]` with Hq % Hkv == 0 (GQA by reshaping queries).
        scale: softmax scale, default 1/sqrt(D).
        causal: bottom-right aligned: query i sees keys `<= end - qlen + i`, where end is `kv_lens[b]`
            (or Lkv) and qlen is `q_lens[b]` (or Lq).
        kv_lens: int `[B]`; keys at or beyond `kv_lens[b]` are never read (NaN there is harmless).
        q_lens: int `[B]`; query rows at or beyond `q_lens[b]` are padding and come out as 0.
        attn_mask: bool (True = attend) or additive float mask broadcastable to `[B, Hq, Lq, Lkv]`.

    Returns:
        float64 `[B, Hq, Lq, D]`; rows with no visible key are 0.
    """
    check_qkv(q, k, v)
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    device = q.device
    ends = _valid_lengths(kv_lens, kv_len, batch, "kv_lens", device)
    qlens = _valid_lengths(q_lens, q_len, batch, "q_lens", device)

    key_valid = torch.arange(kv_len, device=device)[None, :] < ends[:, None]  # [B, Lkv]
    # Zero the padding before any arithmetic so NaN/Inf stored there cannot leak through 0 * NaN.
    k64 = torch.where(key_valid[:, None, :, None], k.double(), 0.0)
    v64 = torch.where(key_valid[:, None, :, None], v.double(), 0.0)
    q64 = q.double().reshape(batch, num_kv_heads, group, q_len, head_dim)

    logits = torch.einsum("bhgqd,bhkd->bhgqk", q64, k64) * scale
    allowed = _visible_keys(key_valid, ends, qlens, q_len, causal)
    allowed = allowed[:, None, None].expand(batch, num_kv_heads, group, q_len, kv_len)
    if attn_mask is not None:
        mask = _expand_mask(attn_mask.to(device), batch, num_heads, q_len, kv_len)
        mask = mask.reshape(batch, num_kv_heads, group, q_len, kv_len)
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask.double()
    out = _masked_softmax_times(logits, allowed, v64)
    return out.reshape(batch, num_heads, q_len, head_dim)


def _visible_keys(
    key_valid: torch.Tensor, ends: torch.Tensor, qlens: torch.Tensor, q_len: int, causal: bool
) -> torch.Tensor:
    """bool `[B, Lq, Lkv]`: the keys each query row may see (valid keys, bottom-right causal, valid rows)."""
    batch, kv_len = key_valid.shape
    key_pos = torch.arange(kv_len, device=key_valid.device)
    query_pos = torch.arange(q_len, device=key_valid.device)
    allowed = key_valid[:, None, :].expand(batch, q_len, kv_len)
    if causal:
        last_visible = ends[:, None] - qlens[:, None] + query_pos[None, :]  # [B, Lq]
        allowed = allowed & (key_pos[None, None, :] <= last_visible[:, :, None])
    return allowed & (query_pos[None, :] < qlens[:, None])[:, :, None]


def _masked_softmax_times(logits: torch.Tensor, allowed: torch.Tensor, v64: torch.Tensor) -> torch.Tensor:
    """softmax(logits over the allowed keys) @ v per `[B, Hkv, G, Lq]` row; rows with no visible key are 0."""
    logits = logits.masked_fill(~allowed, -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)
    # A row with no visible key is 0; NaN in visible inputs still propagates (the oracle hides nothing).
    row_live = row_max != -math.inf
    weights = torch.exp(logits - torch.where(row_live, row_max, 0.0))
    denom = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, v64) / torch.where(row_live, denom, 1.0)
    return torch.where(row_live, out, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Case:
    """One attention call to check: inputs plus options, with a name saying what it probes."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    causal: bool = False
    kv_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    def kwargs(self) -> dict:
        """Keyword arguments for the function under test: `causal` always, the rest when set."""
        extra = {
            "scale": self.scale,
            "kv_lens": self.kv_lens,
            "q_lens": self.q_lens,
            "attn_mask": self.attn_mask,
        }
        return {"causal": self.causal, **{key: value for key, value in extra.items() if value is not None}}

    def reference(self) -> torch.Tensor:
        return reference_attention(self.q, self.k, self.v, **self.kwargs())

    def describe(self) -> str:
        b, hq, lq, d = self.q.shape
        hkv, lkv = self.k.shape[1], self.k.shape[2]
        return f"{self.name} B={b} Hq={hq} Hkv={hkv} Lq={lq} Lkv={lkv} D={d} {str(self.q.dtype)[6:]}"


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    """Standard-normal draws made on `device` (large GPU inputs are not drawn on the CPU), seeded from the
    CPU `generator` when one is given so a seeded case is reproducible."""
    device = torch.device(device)
    local = None
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        local = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=local, dtype=torch.float32, device=device).to(dtype)


def _draw_qkv(cfg: AttentionConfig, device, generator, strided: bool) -> tuple[torch.Tensor, ...]:
    dtype = cfg.dtype
    b, hq, lq, d = cfg.q_shape
    hkv, lkv = cfg.num_kv_heads, cfg.kv_len
    if not strided:
        return tuple(
            _randn(s, dtype, device, generator) for s in ((b, hq, lq, d), (b, hkv, lkv, d), (b, hkv, lkv, d))
        )
    # q as transformers makes it ([B, L, H, D] transposed); k, v sliced out of a longer, padded cache buffer.
    q = _randn((b, lq, hq, d), dtype, device, generator).transpose(1, 2)
    cache = _randn((2, b, hkv, lkv + 13, d + 8), dtype, device, generator)
    return q, cache[0, :, :, 3 : 3 + lkv, :d], cache[1, :, :, 3 : 3 + lkv, 4 : 4 + d]


def _draw_lengths(cfg: AttentionConfig, generator) -> torch.Tensor:
    """Valid lengths in [Lq, Lkv] (at least Lq so the new tokens fit), the first one short when possible."""
    low = cfg.seq_len if cfg.causal else 1
    lens = torch.randint(low, cfg.kv_len + 1, (cfg.batch_size,), generator=generator)
    if cfg.kv_len > low:
        lens[0] = torch.randint(low, cfg.kv_len, (1,), generator=generator)
    return lens.to(torch.int32)


def random_case(cfg: AttentionConfig, *, device="cpu", kv_lens=None, strided=False, generator=None,
                name="random") -> Case:  # fmt: skip
    """Standard-normal q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` of `cfg`'s sizes and dtype, masked as `cfg`
    says (causal or not), fresh draws unless a generator is given; kv_lens `[B]` optional."""
    q, k, v = _draw_qkv(cfg, device, generator, strided)
    lens = None if kv_lens is None else torch.as_tensor(kv_lens, dtype=torch.int32, device=device)
    return Case(name, q, k, v, causal=cfg.causal, kv_lens=lens)


def strided_case(cfg: AttentionConfig, **options) -> Case:
    """Random inputs as non-contiguous views: transposed q, k/v sliced out of a padded cache buffer."""
    return random_case(cfg, strided=True, name="strided", **options)


def large_logits_case(cfg: AttentionConfig, *, magnitude: float = 6.0, **options) -> Case:
    """Random q and k scaled so logits reach ~magnitude^2: probes the running-max rescaling."""
    case = random_case(cfg, name="large", **options)
    case.q.mul_(magnitude)
    case.k.mul_(magnitude)
    return case


def needle_case(cfg: AttentionConfig, *, position: str = "random", generator=None, **options) -> Case:
    """One key per (batch, kv head) dominates every query of its group, so skipping any block shows.

    position: "random" (anywhere every query can see) or "last" (the last key every query can see).
    """
    case = random_case(cfg, name=f"needle-{position}", generator=generator, **options)
    b, hkv, d = cfg.batch_size, cfg.num_kv_heads, cfg.head_dim
    ends = _valid_lengths(case.kv_lens, cfg.kv_len, b, "kv_lens", "cpu")
    # Keys visible to every query: causal hides the last Lq - 1 from the first query.
    last = ends - (cfg.seq_len if cfg.causal else 1)
    direction = torch.nn.functional.normalize(torch.randn(b, hkv, d, generator=generator), dim=-1)
    q = case.q.float().cpu().reshape(b, hkv, cfg.gqa_ratio, cfg.seq_len, d)
    q += 4.0 * direction[:, :, None, None, :]
    case.q.copy_(q.reshape(case.q.shape).to(case.q.dtype))
    for bi in range(b):
        for hi in range(hkv):
            top = int(last[bi])
            pos = top if position == "last" else int(torch.randint(0, top + 1, (1,), generator=generator))
            key = 4.0 * math.sqrt(d) * direction[bi, hi]
            case.k[bi, hi, pos] = key.to(device=case.k.device, dtype=case.k.dtype)
            value = 4.0 * torch.randn(d, generator=generator)
            case.v[bi, hi, pos] = value.to(device=case.v.device, dtype=case.v.dtype)
    return case


def poisoned_case(cfg: AttentionConfig, *, generator=None, **options) -> Case:
    """Random valid lengths per sequence; k and v beyond them hold NaN and +Inf, which must not matter."""
    lens = _draw_lengths(cfg, generator)
    case = random_case(cfg, kv_lens=lens, generator=generator, name="poisoned", **options)
    for bi, end in enumerate(lens.tolist()):
        for t in (case.k, case.v):
            t[bi, :, end::2] = math.nan
            t[bi, :, end + 1 :: 2] = math.inf
    return case


def odd_shapes(num_heads: int, num_kv_heads: int, head_dim: int, *, batch: int = 1, q_len: int | None = None,
               max_len: int = ODD_LENGTHS[-1], dtype: torch.dtype = torch.float32,
               causal: bool = False) -> list[AttentionConfig]:  # fmt: skip
    """Configs at the protocol's odd lengths (ODD_LENGTHS) up to `max_len`: Lkv = L and Lq = min(q_len, L),
    or Lq = L (fresh prefill) when q_len is None."""
    return [
        AttentionConfig.from_sizes(
            batch,
            num_heads,
            num_kv_heads,
            length if q_len is None else min(q_len, length),
            length,
            head_dim,
            dtype=dtype,
            causal=causal,
        )  # fmt: skip
        for length in ODD_LENGTHS
        if length <= max_len
    ]


def protocol_cases(cfg: AttentionConfig, *, device="cpu", kinds=CASE_KINDS, generator=None) -> list[Case]:
    """The protocol's inputs for a call shaped like `cfg` (sizes, dtype, causal): every kind in `kinds` (see
    CASE_KINDS), fresh draws."""
    makers = {
        "random": random_case,
        "needle": lambda c, **o: needle_case(c, position="last", **o),
        "large": large_logits_case,
        "poisoned": poisoned_case,
        "strided": strided_case,
    }
    unknown = set(kinds) - set(makers)
    if unknown:
        raise ValueError(f"unknown case kinds {sorted(unknown)}; accepted: {CASE_KINDS}")
    return [makers[kind](cfg, device=device, generator=generator) for kind in kinds]


# ----------------------------------------------------------------------------------------------------------
# The check


@dataclass
class Report:
    """Outcome of checking one function on one case."""

    case: str
    passed: bool
    max_rel_l2: float
    tolerance: float
    worst_slice: tuple[int, int] | None = None
    nonfinite: int = 0
    reason: str = ""
    per_slice: list[float] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.case}: {self.reason}"


def tolerance_for(dtype: torch.dtype, *, tf32: bool = False) -> float:
    """Pass threshold on the max per-slice relative L2 error for inputs of `dtype`."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype={dtype}; accepted: {list(TOLERANCES)}")
    return TF32_TOLERANCE if (tf32 and dtype == torch.float32) else TOLERANCES[dtype]


def relative_l2_per_slice(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`||out - ref|| / ||ref||` over each (batch, head) slice of `[B, H, L, D]` tensors, in float64."""
    ref = ref.double()
    diff = (out.double().to(ref.device) - ref).flatten(2).norm(dim=-1)
    norm = ref.flatten(2).norm(dim=-1)
    # An all-zero reference slice (fully masked) must come out exactly zero.
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))


def _accepts_out(fn: Callable) -> bool:
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _fail(case: Case, tolerance: float, reason: str, nonfinite: int = 0) -> Report:
    return Report(case.describe(), False, math.inf, tolerance, nonfinite=nonfinite, reason=reason)


def check(fn: Callable, case: Case, *, tf32: bool = False, tolerance: float | None = None) -> Report:
    """Run `fn(q, k, v, **case.kwargs())` and judge it against the oracle (`judge`).

    If `fn` takes `out=`, the output buffer is pre-filled with NaN so an unwritten element fails.
    An exception raised by `fn` is a failure whose reason names it. The oracle is computed after `fn`
    returns, so no tensor holding the right answer exists while `fn` runs.
    """
    tolerance = tolerance_for(case.q.dtype, tf32=tf32) if tolerance is None else tolerance
    kwargs = case.kwargs()
    out = None
    if _accepts_out(fn):
        out = torch.full(case.q.shape, math.nan, dtype=case.q.dtype, device=case.q.device)
        kwargs["out"] = out
    try:
        result = fn(case.q, case.k, case.v, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of the candidate is a verdict, not a crash
        return _fail(case, tolerance, f"raised {type(error).__name__}: {error}")
    if out is not None and result is not None and result.data_ptr() != out.data_ptr():
        return _fail(case, tolerance, "returned a new tensor instead of writing into out=")
    return judge(case, out if result is None else result, tolerance=tolerance)


def judge(case: Case, result, *, tf32: bool = False, tolerance: float | None = None) -> Report:
    """Judge an output already computed for `case` (shape, dtype, finiteness, per-slice relative L2 against
    the float64 oracle). `result` may live on another device than the case (e.g. sent by another process)."""
    tolerance = tolerance_for(case.q.dtype, tf32=tf32) if tolerance is None else tolerance
    expected = case.reference()
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(expected.shape):
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        return _fail(case, tolerance, f"output shape {got}, expected {tuple(expected.shape)}")
    if result.dtype != case.q.dtype:
        return _fail(case, tolerance, f"output dtype {result.dtype}, expected {case.q.dtype}")
    nonfinite = int((~torch.isfinite(result)).sum())
    if nonfinite:
        reason = (
            f"{nonfinite} non-finite output elements (unwritten output, or padding/masked keys were read)"
        )
        return _fail(case, tolerance, reason, nonfinite)
    errors = relative_l2_per_slice(result, expected)
    worst = int(errors.argmax())
    max_err = float(errors.flatten()[worst])
    slice_index = divmod(worst, errors.shape[1])
    passed = max_err <= tolerance
    relation = "<=" if passed else ">"
    worst_at = f"worst slice b={slice_index[0]}, h={slice_index[1]}"
    reason = f"max relative L2 {max_err:.2e} {relation} {tolerance:.0e} ({worst_at})"
    return Report(
        case.describe(), passed, max_err, tolerance, slice_index, 0, reason, errors.flatten().tolist()
    )


def check_all(fn: Callable, cases: Iterable[Case], **options) -> list[Report]:
    """`check` over several cases."""
    return [check(fn, case, **options) for case in cases]


# ----------------------------------------------------------------------------------------------------------
# Known-wrong kernels: the protocol must reject every one (tests, `attnforge demo`, the evolve evaluator).


def _drops_last_keys(q, k, v, *, causal=False, scale=None, kv_lens=None, **_):
    """Skips the last 10% of the key range, as a split-KV kernel with a bad last block would."""
    kv_len = k.shape[2]
    keep = torch.arange(kv_len, device=q.device) < max(1, int(kv_len * 0.9))
    ref = reference_attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, attn_mask=keep)
    return ref.to(q.dtype)


def _returns_zeros(q, k, v, **_):
    return torch.zeros_like(q)


def _ignores_kv_lens(q, k, v, *, causal=False, scale=None, **_):
    """Attends to the whole buffer, as a kernel that never reads kv_lens would."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = None
    if causal:
        query, key = torch.arange(q_len, device=q.device), torch.arange(kv_len, device=q.device)
        mask = key[None, :] <= kv_len - q_len + query[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )


def _top_left_causal(q, k, v, *, causal=False, scale=None, kv_lens=None, **_):
    """torch's is_causal alignment (query i sees keys <= i) instead of bottom-right."""
    q_len, kv_len = q.shape[2], k.shape[2]
    top_left = torch.arange(kv_len, device=q.device)[None, :] <= torch.arange(q_len, device=q.device)[:, None]
    mask = top_left if causal else None
    return reference_attention(q, k, v, scale=scale, kv_lens=kv_lens, attn_mask=mask).to(q.dtype)


PLANTED_BUGS: dict[str, Callable] = {
    "drops-last-10%-of-keys": _drops_last_keys,
    "returns-zeros": _returns_zeros,
    "ignores-kv_lens": _ignores_kv_lens,
    "top-left-causal": _top_left_causal,
}
