"""Decode attention, self-contained: the starting point of attnforge's evolutionary search.

attention(q, k, v, *, scale=None, causal=True, kv_lens=None) -> [B, Hq, Lq, D] in q's dtype
  q: [B, Hq, Lq, D], Lq in 1..16: the last Lq tokens of the cache, causal among themselves (bottom-right).
  k, v: [B, Hkv, Lkv, D], any strides; Hq % Hkv == 0 (GQA is never materialized).
  kv_lens: int [B] valid keys per sequence (the new tokens are its last Lq positions); keys at or beyond it
    are never read (they may hold NaN).
One program serves the Hq/Hkv query heads times the Lq tokens of one KV head over one split of the keys, so K
and V are read once; a second kernel merges the splits' partial softmax results. The evaluator checks every
change against a float64 oracle (needles, poisoned padding, odd sizes) before it times anything.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# EVOLVE-BLOCK-START
def launch_params(batch, num_kv_heads, kv_len, rows, head_dim, sms):
    """Key tile, split count, warps and pipeline stages of one call."""
    block_n = 64
    tiles = triton.cdiv(kv_len, block_n)
    num_splits = max(1, min(sms // max(batch * num_kv_heads, 1), tiles, 64))
    return {"BLOCK_N": block_n, "num_splits": num_splits, "num_warps": 4, "num_stages": 2}


@triton.jit
def _split_kernel(
    Q, K, V, KvLens, PartO, PartML,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    scale_log2, kv_len, num_kv_heads, num_splits,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV_LENS: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)  # row = head_in_group * Q_LEN + token
    row_ok = rows < GROUP * Q_LEN
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qm + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_KV_LENS:  # noqa: SIM108 - clamped: never outside the buffer
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    else:
        end = kv_len
    tiles_per_split = tl.cdiv(tl.cdiv(end, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    stop = tl.minimum(start + tiles_per_split * BLOCK_N, end)
    last_visible = end - Q_LEN + token
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
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
        qk = tl.where(n[None, :] <= last_visible[:, None], qk * scale_log2, float("-inf"))
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
    part = bh.to(tl.int64) * num_splits + split
    tl.store(PartML + part * 2 * BLOCK_M + rows, m_i)
    tl.store(PartML + part * 2 * BLOCK_M + BLOCK_M + rows, l_i)
    tl.store(PartO + (part * BLOCK_M + rows[:, None]) * D_BLOCK + d[None, :], acc)


@triton.jit
def _merge_kernel(
    PartO, PartML, Out, stride_ob, stride_oh, stride_om, stride_od, num_kv_heads, num_splits,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_BLOCK)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for s in range(0, num_splits):
        part = bh.to(tl.int64) * num_splits + s
        m_s = tl.load(PartML + part * 2 * BLOCK_M + rows)
        l_s = tl.load(PartML + part * 2 * BLOCK_M + BLOCK_M + rows)
        o_s = tl.load(PartO + (part * BLOCK_M + rows[:, None]) * D_BLOCK + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        mine = tl.exp2(m - m_safe)
        theirs = tl.exp2(m_s - m_safe)
        l_sum = l_sum * mine + l_s * theirs
        acc = acc * mine[:, None] + o_s * theirs[:, None]
        m = m_new
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    o_ptrs = (
        Out + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_om + d[None, :] * stride_od
    )
    mask = (rows < GROUP * Q_LEN)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


def _decode(q, k, v, scale, kv_lens):
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    rows = group * q_len
    block_m = max(16, triton.next_power_of_2(rows))
    d_block = triton.next_power_of_2(head_dim)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    p = launch_params(batch, num_kv_heads, kv_len, rows, head_dim, sms)
    splits, slots = p["num_splits"], batch * num_kv_heads
    part_o = torch.empty(slots * splits * block_m * d_block, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(slots * splits * 2 * block_m, dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRETED)
    lens = kv_lens if kv_lens is not None else part_ml  # any pointer: unread without kv_lens
    _split_kernel[(splits, slots)](
        q, k, v, lens, part_o, part_ml, *q.stride(), *k.stride(), *v.stride(),
        scale * LOG2E, kv_len, num_kv_heads, splits,
        GROUP=group, Q_LEN=q_len, HEAD_DIM=head_dim, D_BLOCK=d_block, BLOCK_M=block_m,
        BLOCK_N=p["BLOCK_N"], HAS_KV_LENS=kv_lens is not None, FP32_DOT=fp32_dot,
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    _merge_kernel[(slots,)](
        part_o, part_ml, out, *out.stride(), num_kv_heads, splits,
        GROUP=group, Q_LEN=q_len, HEAD_DIM=head_dim, D_BLOCK=d_block, BLOCK_M=block_m, num_warps=4,
    )  # fmt: skip
    return out


# EVOLVE-BLOCK-END


def attention(q, k, v, *, scale=None, causal=True, kv_lens=None):
    """The entry point the evaluator calls (its signature is fixed)."""
    if not causal and q.shape[2] > 1:
        raise ValueError("decode attention is causal among the new tokens")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode(q, k, v, scale, kv_lens)
