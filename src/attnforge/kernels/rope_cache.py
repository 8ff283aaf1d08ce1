"""A decode step's query/key preparation in one launch: per-head RMSNorm, RoPE, and the cache write.

Between the q/k/v product and decode attention, a decode step normalizes each query and key head (Qwen3's
q_norm / k_norm), rotates them (RoPE, the rotate-half form of transformers' Llama family), and stores the new
key and value at each sequence's position in the static cache. Each is a small elementwise pass over a few KB;
as separate launches they cost more than their bytes. Here one program per (sequence, head) does all of it:
query heads write the rotated query, key/value heads write the rotated key and the value into the cache.

Rounding follows torch's ops in the working dtype: the norm's output, each RoPE product and the sum are
rounded as `q * cos + rotate_half(q) * sin` rounds them. A position outside the cache is not written (the
caller keeps positions in range; nothing outside a buffer is ever touched).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnforge.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_options, pdl_supported

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def rope_rows(rows, row_ok, Gain, cos_row, sin_row, d, d_ok, eps, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """Heads at row pointers `rows` `[M]` (valid where `row_ok`), columns `d` `[D_BLOCK]` (valid where
    `d_ok`), normalized (NORM: RMSNorm over the head with gain `Gain`) and rotated by the tables' rows
    `cos_row`, `sin_row`: `[M, D_BLOCK]` in the tables' dtype, 0 where masked. Rounded as torch's ops round in
    that dtype: the norm's output, its product with the gain, each RoPE product and their sum."""
    dtype = cos_row.dtype.element_ty
    half = HEAD_DIM // 2
    # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + half] below half, x[d - half] above
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    ok = row_ok[:, None] & d_ok[None, :]
    x = tl.load(rows[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(rows[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
        g = tl.load(Gain + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        gp = tl.load(Gain + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x = ((x * inv).to(dtype).to(tl.float32) * g).to(dtype).to(tl.float32)
        xp = ((xp * inv).to(dtype).to(tl.float32) * gp).to(dtype).to(tl.float32)
    c = tl.load(cos_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    y = (x * c).to(dtype).to(tl.float32) + (sign[None, :] * xp * s).to(dtype).to(tl.float32)
    return y.to(dtype)


@triton.jit
def store_new_kv(CacheK, CacheV, slot, k, v, d, d_ok, pos, max_seq):
    """Write the new key `k` `[1, D_BLOCK]` and value `v` `[D_BLOCK]` into the caches at offset `slot`, if
    the position `pos` lies in [0, max_seq) (a position outside the cache is not written)."""
    at = d * 0 + pos  # a vector: the interpreter masks with vectors only
    store = d_ok & (at >= 0) & (at < max_seq)
    tl.store(CacheK + slot + d[None, :], k, mask=store[None, :])
    tl.store(CacheV + slot + d, v, mask=store)


@triton.jit
def _rope_cache_kernel(
    QKV, Cos, Sin, Positions, QGain, KGain, QOut, CacheK, CacheV,
    stride_qkv_b, stride_cos, stride_qo_b, stride_qo_h, stride_cb, stride_ch, stride_cs,
    max_seq, eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # launched early (PDL): let the next kernel launch too, then wait for the q/k/v product
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    head = tl.program_id(1)  # query heads first, then key/value heads
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    one = tl.arange(0, 1)
    pos = tl.load(Positions + b)
    safe = tl.minimum(tl.maximum(pos, 0), max_seq - 1)  # the tables have a row per cache position
    cos_row, sin_row = Cos + safe * stride_cos, Sin + safe * stride_cos
    qkv_row = QKV + b * stride_qkv_b
    if head < NUM_HEADS:
        row = qkv_row + head * HEAD_DIM + one
        q = rope_rows(row, one == 0, QGain, cos_row, sin_row, d, d_ok, eps, HEAD_DIM, Q_NORM)
        out = QOut + b * stride_qo_b + head * stride_qo_h
        tl.store(out + d[None, :], q, mask=d_ok[None, :])
    else:
        kv_head = head - NUM_HEADS
        k_row = qkv_row + (NUM_HEADS + kv_head) * HEAD_DIM
        k = rope_rows(k_row + one, one == 0, KGain, cos_row, sin_row, d, d_ok, eps, HEAD_DIM, K_NORM)
        v = tl.load(k_row + NUM_KV_HEADS * HEAD_DIM + d, mask=d_ok, other=0.0)
        slot = b * stride_cb + kv_head * stride_ch + pos * stride_cs
        store_new_kv(CacheK, CacheV, slot, k, v, d, d_ok, pos, max_seq)


def _check(qkv, cos, sin, positions, cache_k, cache_v, num_heads, gains) -> None:
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv has dtype {qkv.dtype}; supported: {DTYPES}")
    if cache_k.dim() != 4 or cache_v.shape != cache_k.shape:
        raise ValueError(f"cache_k {tuple(cache_k.shape)} and cache_v {tuple(cache_v.shape)} must be "
                         "[batch, kv_heads, max_seq, head_dim] alike")  # fmt: skip
    batch, num_kv_heads, _, head_dim = cache_k.shape
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 3 or qkv.shape[1] != 1 or qkv.shape[2] != width or qkv.shape[0] > batch:
        raise ValueError(f"qkv must be [b <= {batch}, 1, {width}] (one new token), got {tuple(qkv.shape)}")
    max_seq = cache_k.shape[2]
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must be [positions, {head_dim}] (even head_dim), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    if cos.shape[0] < max_seq:
        raise ValueError(
            f"cos and sin have {cos.shape[0]} rows; they need one per cache position ({max_seq})"
        )
    if tuple(positions.shape) != (qkv.shape[0], 1) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be integer [{qkv.shape[0]}, 1], got {tuple(positions.shape)}")
    for name, tensor in {"cos": cos, "sin": sin, "cache_k": cache_k, "cache_v": cache_v, **gains}.items():
        if tensor is not None and (tensor.dtype != qkv.dtype or tensor.device != qkv.device):
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device}; qkv is {qkv.dtype} on {qkv.device}"
            )
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if cache_v.stride() != cache_k.stride():
        raise ValueError(f"cache_k and cache_v must have the same strides, got {cache_k.stride()} and "
                         f"{cache_v.stride()}")  # fmt: skip
    for name, gain in gains.items():
        if gain is not None and tuple(gain.shape) != (head_dim,):
            raise ValueError(f"{name} must have shape ({head_dim},), got {tuple(gain.shape)}")


def launch_rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads, q_out):
    """Run the kernel (arguments as `rope_and_store`, checked), writing `q_out` and the caches."""
    batch, head_dim, num_kv_heads = qkv.shape[0], cache_k.shape[3], cache_k.shape[1]
    if batch == 0:
        return
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    dummy = cos
    _rope_cache_kernel[(batch, num_heads + num_kv_heads)](
        qkv, cos, sin, positions.reshape(batch).contiguous(), dummy if q_gain is None else q_gain,
        dummy if k_gain is None else k_gain, q_out, cache_k, cache_v,
        qkv.stride(0), cos.stride(0), q_out.stride(0), q_out.stride(1), cache_k.stride(0), cache_k.stride(1),
        cache_k.stride(2), cache_k.shape[2], float(eps),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        D_BLOCK=triton.next_power_of_2(head_dim), Q_NORM=q_gain is not None, K_NORM=k_gain is not None,
        num_warps=1, **pdl_options(pdl_supported(qkv.device)),
    )  # fmt: skip


@torch.library.custom_op("attnforge::rope_and_store", mutates_args=("cache_k", "cache_v"))
def _rope_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
             cache_k: torch.Tensor, cache_v: torch.Tensor, q_gain: torch.Tensor | None,
             k_gain: torch.Tensor | None, eps: float, num_heads: int) -> torch.Tensor:  # fmt: skip
    q_out = qkv.new_empty(qkv.shape[0], num_heads, 1, cache_k.shape[3])
    launch_rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads, q_out)
    return q_out


@_rope_op.register_fake
def _(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads):
    return qkv.new_empty(qkv.shape[0], num_heads, 1, cache_k.shape[3])


def rope_and_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    *,
    num_heads: int,
    q_norm: tuple[torch.Tensor, float] | None = None,
    k_norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotated queries `[b, Hq, 1, D]` of one new token per sequence; its key and value go into the cache.

    Args:
        qkv: `[b, 1, (Hq + 2 Hkv) * D]`, the fused q/k/v product (queries, keys, values, head by head).
        cos, sin: `[max_positions, D]` RoPE tables (transformers' layout: the frequencies twice).
        positions: `[b, 1]` int, each sequence's position of the new token (row of the tables, cache slot).
        cache_k, cache_v: `[batch >= b, Hkv, max_seq, D]`, written at `[i, :, positions[i], :]`.
        num_heads: Hq. q_norm, k_norm: `(gain [D], eps)` RMSNorm per head before RoPE (Qwen3), or None.
    """
    q_gain, k_gain, eps = check_new_token(
        qkv, cos, sin, positions, cache_k, cache_v, num_heads, q_norm, k_norm
    )
    return _rope_op(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads)


def check_new_token(qkv, cos, sin, positions, cache_k, cache_v, num_heads, q_norm, k_norm) -> tuple:
    """Validate a new token's inputs (as `rope_and_store`'s); returns (q gain, k gain, eps) for the kernel."""
    if q_norm is not None and k_norm is not None and q_norm[1] != k_norm[1]:
        raise ValueError(f"q_norm and k_norm must share eps, got {q_norm[1]} and {k_norm[1]}")
    q_gain, k_gain = (None if n is None else n[0] for n in (q_norm, k_norm))
    eps = next((n[1] for n in (q_norm, k_norm) if n is not None), 0.0)
    _check(
        qkv, cos, sin, positions, cache_k, cache_v, num_heads, {"q_norm gain": q_gain, "k_norm gain": k_gain}
    )
    return q_gain, k_gain, float(eps)
