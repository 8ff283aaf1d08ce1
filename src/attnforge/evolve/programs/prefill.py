"""Prefill attention, self-contained: the starting point of attnforge's evolutionary search.

attention(q, k, v, *, scale=None, causal=True, kv_lens=None) -> [B, Hq, Lq, D] in q's dtype
  q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lkv, D], Lq <= Lkv, any strides; Hq % Hkv == 0 (GQA, not materialized).
  causal: bottom-right aligned: query i sees keys <= end - Lq + i, end = kv_lens[b] (or Lkv).
  kv_lens: int [B] valid keys per sequence; keys at or beyond it are never read (they may hold NaN).
FlashAttention-2 style: one program per (batch, query head, block of query rows) walks the visible key blocks
with an online softmax in base 2. The evaluator checks every change against a float64 oracle before timing it.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# EVOLVE-BLOCK-START
def launch_params(batch, num_heads, q_len, kv_len, head_dim):
    """Query and key tiles, warps and pipeline stages of one call."""
    block_m = 64 if q_len >= 64 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# One kernel body on purpose (just over the 60-line rule): a self-contained seed program for evolution.
@triton.jit
def _prefill_kernel(
    Q, K, V, Out, KvLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2, q_len, kv_len, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    head = (bh % num_heads).to(tl.int64)
    h = head // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + head * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_KV_LENS:  # noqa: SIM108 - clamped: never outside the buffer
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    else:
        end = kv_len
    last_visible = end - q_len + rows
    if CAUSAL:  # noqa: SIM108
        hi = tl.minimum(end, end - q_len + (m_block + 1) * BLOCK_M)
    else:
        hi = end
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k_ptrs = K + b * stride_kb + h * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v_ptrs = V + b * stride_vb + h * stride_vh + n[:, None] * stride_vn + d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= last_visible[:, None])
        qk = tl.where(visible, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + head * stride_oh + rows[:, None] * stride_om + d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _prefill(q, k, v, scale, causal, kv_lens):
    batch, num_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    p = launch_params(batch, num_heads, q_len, kv_len, head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRETED)
    lens = kv_lens if kv_lens is not None else out  # any pointer: unread without kv_lens
    grid = (triton.cdiv(q_len, p["BLOCK_M"]), batch * num_heads)
    _prefill_kernel[grid](
        q, k, v, out, lens, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E, q_len, kv_len, num_heads,
        GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim, D_BLOCK=triton.next_power_of_2(head_dim),
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        FP32_DOT=fp32_dot, num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    return out


# EVOLVE-BLOCK-END


def attention(q, k, v, *, scale=None, causal=True, kv_lens=None):
    """The entry point the evaluator calls (its signature is fixed)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _prefill(q, k, v, scale, bool(causal), kv_lens)
