"""A decode step's attention with the new token's preparation fused in: one launch per layer.

Between the q/k/v product and attention, a decode step normalizes and rotates the new token's query and key
heads and stores its key and value in the static cache (`rope_cache.rope_and_store`, a launch of its own).
Here the decode kernel does that too. Each program (a KV head, a split of the cached keys) rotates the queries
of its head group from the q/k/v product (a few hundred bytes), runs the online softmax over its split of the
keys before the new position (`split_kv.attend`), and split 0 also rotates the new key, stores it and the
value in the cache and adds the new token to its result. No program reads the slot the new key goes to, so
nothing waits for that write; splits merge as in `decode.py` (the last program to arrive merges).

Launch parameters are decode's for the same call with `kv_lens` (its tuning entries), merged in the kernel.
Positions outside [0, max_seq) write nothing; such a token attends to the cached keys below its position that
exist and to itself (rotated at the nearest table row): nothing outside a buffer is ever read or written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnforge.config import SUPPORTED_HEAD_DIMS, resolve_scale
from attnforge.kernels.decode import LOG2E, DecodeWorkspace, default_workspace, merged_in_kernel
from attnforge.kernels.pdl import gdc_launch_dependents, gdc_wait
from attnforge.kernels.rope_cache import check_new_token, rope_rows, store_new_kv
from attnforge.kernels.split_kv import attend, finish_split, split_range

# Launch constants of decode's kernel that this one fixes (one new token, lengths from positions, one launch).
_FIXED = ("Q_LEN", "HAS_KV_LENS", "HAS_KV_STARTS", "MERGE_LAST")


@triton.jit
def _decode_step_kernel(
    QKV, Cos, Sin, Positions, QGain, KGain, CacheK, CacheV, KSrc, VSrc, Out, PartO, Counters,
    stride_qkv_b, stride_cos, stride_cb, stride_ch, stride_cn, stride_ob, stride_oh,
    max_seq, eps, scale_log2, num_kv_heads, num_splits, ml_offset,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr, Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr, FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr, ALONE_TILES: tl.constexpr,
    USE_TMA: tl.constexpr, MERGE_LO: tl.constexpr = 0,
):  # fmt: skip
    # One function on purpose (kernels are exempt from the 60-line rule): the steps below are split_kv's and
    # rope_cache's device functions; what is left is the new token's part, which needs their values.
    split = tl.program_id(0)
    slot = tl.program_id(1)  # (batch, kv head, block of query rows)
    m_block = slot % NUM_M_BLOCKS
    b = (slot // NUM_M_BLOCKS // num_kv_heads).to(tl.int64)
    h = (slot // NUM_M_BLOCKS % num_kv_heads).to(tl.int64)
    cache_head = b * stride_cb + h * stride_ch
    if USE_PDL:  # launched early (PDL): let the next kernel launch too, then wait for the q/k/v product
        gdc_launch_dependents()
        gdc_wait()
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = h * GROUP + rows
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM

    pos = tl.load(Positions + b)
    cached = tl.minimum(tl.maximum(pos, 0), max_seq).to(tl.int32)  # the keys before the new token
    table = tl.minimum(tl.maximum(pos, 0), max_seq - 1)  # the tables have a row per cache position
    cos_row, sin_row = Cos + table * stride_cos, Sin + table * stride_cos
    qkv_row = QKV + b * stride_qkv_b
    q = rope_rows(qkv_row + head * HEAD_DIM, row_ok, QGain, cos_row, sin_row, d, d_ok, eps, HEAD_DIM, Q_NORM)

    alone, start, stop = split_range(0, cached, split, num_splits, BLOCK_N, ALONE_TILES)
    last_visible = tl.zeros([BLOCK_M], tl.int32) + cached - 1
    if USE_TMA:  # the caches read through 4-d descriptors (KSrc, VSrc); the new key is stored by pointer
        k_src, v_src = KSrc, VSrc
    else:
        k_src, v_src = CacheK + cache_head, CacheV + cache_head
    m_i, l_i, acc = attend(q, k_src, v_src, start, stop, cached, last_visible, scale_log2, d, d_ok, stride_cn,
                           1, stride_cn, 1, BLOCK_M, D_BLOCK, BLOCK_N, FP32_DOT, b.to(tl.int32),
                           h.to(tl.int32), USE_TMA)  # fmt: skip

    if split == 0:  # the new token: its rotated key and its value go into the cache and into this result
        one = tl.arange(0, 1)
        k_row = qkv_row + (NUM_HEADS + h) * HEAD_DIM
        k = rope_rows(k_row + one, one == 0, KGain, cos_row, sin_row, d, d_ok, eps, HEAD_DIM, K_NORM)
        v = tl.load(k_row + num_kv_heads * HEAD_DIM + d, mask=d_ok, other=0.0)
        if m_block == 0:
            store_new_kv(CacheK, CacheV, cache_head + pos * stride_cn, k, v, d, d_ok, pos, max_seq)
        score = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scale_log2
        m_new = tl.maximum(m_i, score)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new)
        l_i = l_i * alpha + p
        if not FP32_DOT:  # rounded as the loop's probabilities are for their product with V
            p = p.to(v.dtype).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
        m_i = m_new

    o_ptrs = Out + b * stride_ob + head * stride_oh
    finish_split(o_ptrs, acc, l_i, m_i, Out, PartO, Counters, split, alone, slot, b, h, m_block, d, d_ok,
                 row_ok, stride_ob, stride_oh, 0, 1, num_splits, ml_offset, GROUP, 1, D_BLOCK, BLOCK_M, SPLIT,
                 SPLITS_P2, PART_ROWS, S_CHUNK, True, MERGE_LO)  # fmt: skip


def launch_decode_step(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads, scale,
                       out, workspace: DecodeWorkspace | None = None) -> None:  # fmt: skip
    """Run the kernel on checked inputs (as `decode_step_attention`'s), writing `out` `[b, Hq, 1, D]` and the
    caches."""
    batch, (_, num_kv_heads, max_seq, head_dim) = qkv.shape[0], cache_k.shape
    if batch == 0:
        return
    shape = (batch, num_heads, 1, head_dim)
    launch = merged_in_kernel(shape, num_kv_heads, max_seq, qkv.dtype, qkv.device)
    workspace = workspace or default_workspace(qkv.device, launch.floats, launch.slots)
    partials, counters = workspace.buffers(launch.floats, launch.slots)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    k_src, v_src, constants = launch.kv_sources(cache_k, cache_v)
    constants = {k: v for k, v in constants.items() if k not in _FIXED}
    dummy = cos
    _decode_step_kernel[launch.grid](
        qkv, cos, sin, positions.reshape(batch).contiguous(), dummy if q_gain is None else q_gain,
        dummy if k_gain is None else k_gain, cache_k, cache_v, k_src, v_src, out, partials, counters,
        qkv.stride(0), cos.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), out.stride(0),
        out.stride(1), max_seq, eps, scale * LOG2E, num_kv_heads, launch.splits, launch.ml_offset,
        NUM_HEADS=num_heads, Q_NORM=q_gain is not None, K_NORM=k_gain is not None, **constants,
    )  # fmt: skip


def workspace_size(batch: int, num_heads: int, cache_k: torch.Tensor) -> tuple[int, int]:
    """(partial floats, counters) a call of `batch` new tokens of `num_heads` query heads against `cache_k`
    `[B, Hkv, max_seq, D]` needs."""
    _, num_kv_heads, max_seq, head_dim = cache_k.shape
    shape = (batch, num_heads, 1, head_dim)
    launch = merged_in_kernel(shape, num_kv_heads, max_seq, cache_k.dtype, cache_k.device)
    return launch.floats, launch.slots


@torch.library.custom_op(
    "attnforge::decode_step_attention", mutates_args=("cache_k", "cache_v", "partials", "counters")
)
def _step_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
             cache_k: torch.Tensor, cache_v: torch.Tensor, q_gain: torch.Tensor | None,
             k_gain: torch.Tensor | None, eps: float, num_heads: int, scale: float,
             partials: torch.Tensor | None, counters: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The kernel as an op (opaque to torch.compile): on the caller's workspace, or without one on a
    temporary (allocated here, freed when the call returns)."""
    out = qkv.new_empty(qkv.shape[0], num_heads, 1, cache_k.shape[3])
    if partials is None or counters is None:
        workspace = DecodeWorkspace(qkv.device, *workspace_size(qkv.shape[0], num_heads, cache_k))
    else:
        workspace = DecodeWorkspace.over(partials, counters)
    launch_decode_step(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads, scale, out,
                       workspace)  # fmt: skip
    return out


@_step_op.register_fake
def _(qkv, cos, sin, positions, cache_k, cache_v, q_gain, k_gain, eps, num_heads, scale, partials, counters):
    return qkv.new_empty(qkv.shape[0], num_heads, 1, cache_k.shape[3])


def decode_step_attention(
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
    scale: float | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Attention output `[b, Hq, 1, D]` of one new token per sequence, straight from the q/k/v product: its
    query and key heads normalized and rotated, its key and value stored in the cache, and the query attending
    to the cached keys before its position and to itself. What `rope_and_store` then `decode_attention(...,
    kv_lens=positions + 1)` compute, in one launch.

    Args:
        qkv: `[b, 1, (Hq + 2 Hkv) * D]`, the fused q/k/v product (queries, keys, values, head by head).
        cos, sin: `[>= max_seq, D]` RoPE tables (transformers' layout: the frequencies twice).
        positions: `[b, 1]` int, each sequence's position of the new token: its table row and cache slot; the
            cache holds its earlier keys at [0, position).
        cache_k, cache_v: `[batch >= b, Hkv, max_seq, D]`, same strides, written at `[i, :, positions[i]]`.
        num_heads: Hq (a multiple of Hkv). q_norm, k_norm: `(gain [D], eps)` RMSNorm per head before RoPE
            (Qwen3), or None. scale: softmax scale (default 1/sqrt(D)).
        workspace: a DecodeWorkspace owned by the caller (sized with `workspace_size`; one per concurrently
            running stream or graph); default: decode's, per stream (a temporary one inside torch.compile).
    """
    tensors = (qkv, cos, sin, positions, cache_k, cache_v)
    q_gain, k_gain, eps = check_new_token(*tensors, num_heads, q_norm, k_norm)
    head_dim, num_kv_heads = cache_k.shape[3], cache_k.shape[1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported {SUPPORTED_HEAD_DIMS}")
    if num_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of the cache's {num_kv_heads} heads")
    scale = resolve_scale(scale, head_dim)
    args = (*tensors, q_gain, k_gain, eps, num_heads, scale)
    if not torch.compiler.is_compiling():
        out = qkv.new_empty(qkv.shape[0], num_heads, 1, head_dim)
        launch_decode_step(*args, out, workspace)
        return out
    if workspace is None:
        return _step_op(*args, None, None)
    return _step_op(*args, workspace.partials, workspace.counters)
