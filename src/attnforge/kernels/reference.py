"""torch's own attention paths, with attnforge's semantics, as baselines and fallbacks.

All take q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` and follow DESIGN.md: causal is bottom-right aligned,
`kv_lens` [B] marks the valid keys, rows with no visible key are 0. The float64 oracle lives in verify.py.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F


def fused_sdpa_unsafe(t: torch.Tensor) -> str | None:
    """Why torch's fused SDPA kernels (flash, efficient, cuDNN) cannot safely take `t` as it is, or None.

    They read 16-byte vectors: the data pointer and every stride of a dimension longer than 1 must be a
    multiple of 16 bytes, and the last dimension contiguous. torch's efficient backend checks this, but its
    flash backend (torch 2.11) does not and faults on such views (docs/notes/torch-flash-alignment.md).
    """
    if t.device.type != "cuda":
        return None
    if t.data_ptr() % 16:
        return "data pointer not 16-byte aligned"
    if t.stride(-1) != 1:
        return "last dimension not contiguous"
    size = t.element_size()
    if t.is_contiguous() and t.shape[-1] * size % 16 == 0:
        return None
    for dim in range(t.dim() - 1):
        if t.shape[dim] > 1 and t.stride(dim) * size % 16:
            return f"stride of dimension {dim} not a multiple of 16 bytes"
    return None


def fused_sdpa_safe(q, k, v, on_copy=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) as torch's fused SDPA can take them: each unsafe view replaced by a contiguous copy, and
    `on_copy(reason)` called for it ("k: data pointer not 16-byte aligned"). CPU tensors are returned as they
    are, and nothing is checked while torch.compile traces (no data pointers there)."""
    if not q.is_cuda or torch.compiler.is_compiling() or fused_sdpa_aligned(q, k, v):
        return q, k, v
    out = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        why = fused_sdpa_unsafe(t)
        if why is not None:
            t = t.clone(memory_format=torch.contiguous_format)
            if on_copy is not None:
                on_copy(f"{name}: {why}")
        out.append(t)
    return out[0], out[1], out[2]


def fused_sdpa_aligned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Every data pointer and every stride but the last a multiple of 16 bytes, every last stride 1: the
    common case, checked straight through for 4-D inputs (this runs on every call routed to torch, where a
    few Python lines cost microseconds: the caches are cold between two layers). Stricter than
    `fused_sdpa_unsafe`, which forgives the stride of a dimension of size 1: where this says False, that one
    looks closer. Element sizes are powers of two, so OR-ing the strides before scaling loses nothing; q's
    is used for all three (torch SDPA refuses q, k, v of different dtypes before any kernel runs)."""
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if len(sq) == len(sk) == len(sv) == 4:
        if sq[3] != 1 or sk[3] != 1 or sv[3] != 1:
            return False
        strides = sq[0] | sq[1] | sq[2] | sk[0] | sk[1] | sk[2] | sv[0] | sv[1] | sv[2]
    elif sq[-1] != 1 or sk[-1] != 1 or sv[-1] != 1:
        return False
    else:
        strides = functools.reduce(operator.or_, (*sq[:-1], *sk[:-1], *sv[:-1]), 0)
    return not (q.data_ptr() | k.data_ptr() | v.data_ptr() | strides * q.element_size()) & 15


def visibility_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    kv_lens: torch.Tensor | None,
    q_lens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor | None:
    """Bool `[B, 1, Lq, Lkv]` (True = attend) for bottom-right causal / valid lengths; None if all visible."""
    if not causal and kv_lens is None and q_lens is None:
        return None
    key_pos = torch.arange(kv_len, device=device)
    query_pos = torch.arange(q_len, device=device)
    ends = torch.full((batch,), kv_len, device=device) if kv_lens is None else kv_lens.to(device, torch.int64)
    qlens = torch.full((batch,), q_len, device=device) if q_lens is None else q_lens.to(device, torch.int64)
    mask = (key_pos[None, None, :] < ends[:, None, None]).expand(batch, q_len, kv_len)
    if causal:
        last = ends[:, None] - qlens[:, None] + query_pos[None, :]
        mask = mask & (key_pos[None, None, :] <= last[:, :, None])
    mask = mask & (query_pos[None, :, None] < qlens[:, None, None])
    return mask[:, None]


def _merge_masks(visible: torch.Tensor | None, attn_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if attn_mask is None:
        return visible
    if visible is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return visible & attn_mask
    return attn_mask.to(dtype).masked_fill(~visible, float("-inf"))


def _zero_dead_rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """torch returns NaN for rows that see no key; attnforge's convention is 0."""
    if mask is None:
        return out
    live = mask.any(dim=-1, keepdim=True) if mask.dtype == torch.bool else torch.isfinite(mask).any(-1, True)
    return out.masked_fill(~live, 0.0)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    repeat_kv: bool = False,
) -> torch.Tensor:
    """torch SDPA with `enable_gqa=True` (or, with `repeat_kv=True`, K/V repeated as transformers does).

    Causal and valid lengths become an explicit bool mask (torch's is_causal is top-left aligned), except
    where no lengths or mask come with it: square, torch's own is_causal; a chunk of queries against a longer
    cache, torch's `causal_lower_right` (no mask tensor: 31.5 us against 98.7 for the bool mask, B1 32:8 Lq 4
    of 4096 keys on an H100, benchmarks/results/h100/decode-20261206.json). Masked keys still enter the
    matmul, so NaN in padding beyond kv_lens poisons the output: use `sdpa_per_sequence` for poisoned caches.
    Returns `[B, Hq, Lq, D]`.
    """
    batch, num_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    plain_causal = causal and kv_lens is None and q_lens is None and attn_mask is None
    square_causal = plain_causal and q_len == kv_len
    mask = bias = None  # mask: a tensor mask, whose rows that see no key come out as 0 below
    if plain_causal and 1 < q_len < kv_len:  # every row sees keys: nothing to zero
        # imported here: at import time it pulls in Triton before the CLI has set TRITON_INTERPRET on a
        # CPU-only machine, and the kernels then refuse to run in the interpreter (`attnforge demo`)
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q_len, kv_len)
    elif not square_causal:
        visible = visibility_mask(
            batch, q_len, kv_len, causal=causal, kv_lens=kv_lens, q_lens=q_lens, device=q.device
        )
        mask = bias = _merge_masks(visible, attn_mask, q.dtype)
    q, k, v = fused_sdpa_safe(q, k, v)
    group = num_heads // k.shape[1]
    if repeat_kv and group > 1:  # as transformers' repeat_kv: a copy of K and V per query head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, is_causal=square_causal, scale=scale, enable_gqa=not repeat_kv
    )
    return _zero_dead_rows(out, mask)


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention in plain torch operations, for what no fused path covers: tanh logit softcapping
    (`softcap * tanh(logits / softcap)`) and training dropout (`dropout` > 0 drops weights).

    q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, Dv]`, attn_mask bool (True = attend) or additive, broadcastable to
    `[B, Hq, Lq, Lkv]` -> `[B, Hq, Lq, Dv]`; causal is bottom-right aligned, rows that see no key are 0.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    batch, _, q_len, _ = q.shape
    visible = visibility_mask(batch, q_len, k.shape[2], causal=causal, kv_lens=None, device=q.device)
    mask = _merge_masks(visible, attn_mask, logits.dtype)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in float32 at least
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def sdpa_per_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch SDPA (enable_gqa) once per sequence on k/v sliced to `kv_lens[b]`: never reads the padding.

    Returns `[B, Hq, Lq, D]`.
    """
    if kv_lens is None:
        return sdpa(q, k, v, scale=scale, causal=causal)
    out = torch.empty_like(q)
    for b, end in enumerate(kv_lens.tolist()):
        out[b : b + 1] = sdpa(
            q[b : b + 1], k[b : b + 1, :, :end], v[b : b + 1, :, :end], scale=scale, causal=causal
        )
    return out
