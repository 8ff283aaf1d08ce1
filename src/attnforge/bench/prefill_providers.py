"""Prefill providers beyond the SDPA backends: torch's own paths for chunked prefill and padded batches,
attnforge given a mask instead of lengths, and attnforge's prefill kernel at fixed launch parameters (the
`sweep` preset).

torch baselines: SDPA with `causal_lower_right` (a few new tokens against a cache, no mask tensor), flash once
per sequence on its valid part (a padded batch of prompts), and `torch.nn.attention.varlen.varlen_attn` on
packed tokens (`window_size=(-1, 0)` is its causal form, bottom-right aligned; `enable_gqa=True`). Packing and
unpacking happen outside the timed call. Each says why it cannot run a row ("n/a" with the reason).
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnforge.bench.providers import (
    BenchConfig,
    Call,
    Provider,
    prefill_supports,
    prepared_mask,
    zero_padding,
)
from attnforge.kernels import reference, tuning

# The launch-parameter sets the `sweep` preset times: BLOCK_M, BLOCK_N, num_warps, num_stages, TMA loads.
LAUNCH_SETS = ((128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 3, False),
               (64, 64, 4, 3, True))  # fmt: skip


def _has_lengths(cfg: BenchConfig) -> bool:
    return cfg.ragged or cfg.padded


# ----------------------------------------------------------------------------------------------------------
# torch: causal_lower_right, flash per sequence, varlen


def _lower_right_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if not (cfg.causal and 1 < cfg.q_len < cfg.kv_len):
        return False, "causal_lower_right is for causal chunks against a cache (1 < Lq < Lkv)"
    if _has_lengths(cfg):
        return False, "causal_lower_right has no per-sequence lengths"
    return True, ""


def _lower_right_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    """torch SDPA (its own backend choice) with `causal_lower_right`; K/V expanded once, outside the timed
    call, where torch refuses enable_gqa with it."""
    from torch.nn.attention.bias import causal_lower_right

    if kv_lens is not None or q_lens is not None or attn_mask is not None or not causal:
        raise ValueError("causal_lower_right takes no lengths or masks")
    bias = causal_lower_right(q.shape[2], k.shape[2])
    q, k, v = reference.fused_sdpa_safe(q, k, v)

    def call_with(keys, values, gqa: bool) -> Call:
        return lambda: F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bias, scale=scale, enable_gqa=gqa
        )

    group = q.shape[1] // k.shape[1]
    call = call_with(k, v, group > 1)
    try:
        call()
    except RuntimeError:
        call = call_with(k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False)
        call.note = "causal_lower_right refused enable_gqa: K/V expanded to Hq heads once, outside the call"
    return call


def _per_sequence_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if not cfg.padded:
        return False, "one flash call per sequence is the path for padded batches of prompts"
    return True, ""


def _per_sequence_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    """torch flash (enable_gqa, is_causal) once per sequence on its valid part; padded rows stay 0."""
    if q_lens is None or kv_lens is None or q_lens.tolist() != kv_lens.tolist() or attn_mask is not None:
        raise ValueError("the per-sequence path needs q_lens == kv_lens and no mask")
    lens = q_lens.tolist()
    result = torch.zeros_like(q)

    def call() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for b, n in enumerate(lens):
                part = (slice(b, b + 1), slice(None), slice(0, n))
                result[b, :, :n] = F.scaled_dot_product_attention(
                    q[part], k[part], v[part], is_causal=causal, scale=scale, enable_gqa=True
                )[0]
        return result

    return call


def varlen_status(device: torch.device) -> tuple[bool, str]:
    """Whether `torch.nn.attention.varlen.varlen_attn` can run here, else "unsupported: why"."""
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return False, f"unsupported: torch {torch.__version__} has no torch.nn.attention.varlen"
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return False, "unsupported: this torch's varlen_attn takes neither window_size nor is_causal"
    if device.type != "cuda":
        return False, f"unsupported: varlen_attn runs torch's CUDA flash kernel (device {device.type})"
    return True, ""


def _varlen_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if cfg.mask not in ("causal", "none"):
        return False, f"varlen_attn takes no attn_mask (mask={cfg.mask})"
    if cfg.ragged and cfg.q_len > 1:
        return False, "varlen_attn aligns the new tokens to the packed key length; ragged needs seqused_k"
    return varlen_status(device)


def _pack(t: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """`[B, H, L, D]` -> `[sum(lens), H, D]`, the first `lens[b]` positions of each sequence."""
    return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)]).contiguous()


def _varlen_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    """`varlen_attn(q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seq_q [B+1], cu_seq_k [B+1], max_q, max_k, ...)` in
    the installed form (`_varlen_options`): the call returns packed tokens `[Tq, Hq, D]`; `unpack` turns them
    into `[B, Hq, Lq, D]` (padded rows 0)."""
    from torch.nn.attention.varlen import varlen_attn

    if attn_mask is not None:
        raise ValueError("varlen_attn takes no attn_mask")
    params = inspect.signature(varlen_attn).parameters
    options, expand = _varlen_options(params, causal, scale)
    if scale is not None and "scale" not in options:  # its default 1/sqrt(D) on a rescaled query
        q = q * (scale * q.shape[-1] ** 0.5)
    group = q.shape[1] // k.shape[1]
    repeat = expand and group > 1
    if repeat:  # no enable_gqa: K/V repeated to Hq heads, once, outside the timed call
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    batch, _, q_len, _ = q.shape
    q_list = q_lens.tolist() if q_lens is not None else [q_len] * batch
    k_list = kv_lens.tolist() if kv_lens is not None else [k.shape[2]] * batch
    packed = _pack(q, q_list), _pack(k, k_list), _pack(v, k_list)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=q.device)
                  for n in (q_list, k_list))  # fmt: skip

    def call() -> torch.Tensor:
        return varlen_attn(*packed, cu_q, cu_k, max(q_list), max(k_list), **options)

    def unpack(tokens: torch.Tensor) -> torch.Tensor:
        result = torch.zeros_like(q)
        for b, (start, n) in enumerate(zip(itertools.accumulate([0, *q_list]), q_list, strict=False)):
            result[b, :, :n] = tokens[start : start + n].transpose(0, 1)
        return result

    call.unpack = unpack
    if repeat:
        call.note = "this torch's varlen_attn takes no enable_gqa: K/V repeated to Hq heads, outside the call"
    return call


def _varlen_options(params, causal: bool, scale: float | None) -> tuple[dict, bool]:
    """varlen_attn's keyword arguments for this torch, and whether K/V must be expanded to Hq heads first.
    Each option only where the signature has it: causality as `window_size=(-1, 0)` (bottom-right) or
    `(-1, -1)`, else `is_causal`; `enable_gqa` (torch 2.11 has window_size but not it: K/V are repeated);
    `scale` (else the caller scales q)."""
    if "window_size" in params:
        options = {"window_size": (-1, 0) if causal else (-1, -1)}
    else:
        options = {"is_causal": causal}
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    if "scale" in params:
        options["scale"] = scale
    return options, "enable_gqa" not in params


# ----------------------------------------------------------------------------------------------------------
# attnforge given a mask; attnforge at fixed launch parameters


def _mask_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if not _has_lengths(cfg):
        return False, "measures lengths given as a bool mask: rows with kv_lens/q_lens only"
    return prefill_supports(cfg, device)


def _mask_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    """attnforge's prefill kernel given the bool mask transformers builds (built once, outside the call)
    instead of the lengths: what a padded batch costs when only a mask reaches the kernel."""
    from attnforge.kernels.prefill import prefill_attention

    mask, is_causal = prepared_mask(q, k, causal=causal, kv_lens=kv_lens, attn_mask=attn_mask, q_lens=q_lens)
    k, v = zero_padding(k, kv_lens), zero_padding(v, kv_lens)  # with no lengths, it reads the padding
    return lambda: prefill_attention(q, k, v, scale=scale, causal=is_causal, attn_mask=mask, out=out)


def launch_name(params: dict) -> str:
    """'attnforge-prefill[m128-n64-w8-st3]' (+ '-tma')."""
    tma = "-tma" if params.get("tma") else ""
    return (f"attnforge-prefill[m{params['BLOCK_M']}-n{params['BLOCK_N']}-w{params['num_warps']}"
            f"-st{params['num_stages']}{tma}]")  # fmt: skip


def _launch_supports(params: dict):
    def supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
        if params.get("tma") and not (
            device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        ):
            return False, "TMA loads need a Hopper (sm_90+) GPU"
        needed = tuning.pipeline_bytes(params, cfg.head_dim, 4 if cfg.dtype == "float32" else 2)
        if device.type == "cuda" and needed > tuning.HOPPER_SHARED_MEMORY:
            limit = tuning.HOPPER_SHARED_MEMORY // 1024
            return False, f"{needed // 1024} KiB of shared memory for d{cfg.head_dim} (> {limit} KiB)"
        return prefill_supports(cfg, device)

    return supports


def _launch_call(params: dict):
    def make(
        q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
    ) -> Call:
        from attnforge.kernels.prefill import (
            _prefill_into,
        )  # the launcher that takes parameters (as tune does)

        result = torch.empty_like(q) if out is None else out
        scale = q.shape[-1] ** -0.5 if scale is None else scale

        def call() -> torch.Tensor:
            _prefill_into(q, k, v, result, scale, causal, kv_lens, q_lens, attn_mask, params)
            return result

        return call

    return make


def launch_providers() -> list[Provider]:
    """attnforge's prefill kernel at each of LAUNCH_SETS (the `sweep` preset; `attnforge tune` stores the
    winners)."""
    providers = []
    for block_m, block_n, warps, stages, tma in LAUNCH_SETS:
        params = {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "num_warps": warps,
            "num_stages": stages,
            "tma": tma,
        }
        description = f"attnforge prefill kernel at {params}"
        make, supports = _launch_call(params), _launch_supports(params)
        providers.append(Provider(launch_name(params), "candidate", description, make, supports, True))
    return providers


def prefill_baselines() -> list[Provider]:
    """torch's prefill paths beyond the SDPA backends, and attnforge given a mask, in table order."""
    return [
        Provider("attnforge-prefill-mask", "candidate", "attnforge prefill kernel given a bool mask",
                 _mask_call, _mask_supports, writes_out=True),
        Provider("sdpa-lower-right", "baseline", "torch SDPA, causal_lower_right bias, enable_gqa",
                 _lower_right_call, _lower_right_supports),
        Provider("flash-per-sequence", "baseline", "torch flash (enable_gqa) once per sequence, valid part",
                 _per_sequence_call, _per_sequence_supports),
        Provider("torch-varlen", "baseline", "torch.nn.attention.varlen.varlen_attn on packed tokens",
                 _varlen_call, _varlen_supports),
    ]  # fmt: skip
