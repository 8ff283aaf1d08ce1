"""Decode attention: a few new query tokens against a long KV cache, GQA-packed, split-KV, one launch.

One program serves all Hq/Hkv query heads (times the Lq new tokens) of one KV head over one slice ("split") of
the cache, so keys and values are read once. Each split writes a partial (max, sum, unnormalized output) to a
workspace and bumps a per-head counter; the program that arrives last merges the partials and writes the
output, then resets the counter. With one split the program writes the output directly.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from attnforge.config import MAX_DECODE_QUERY_LEN, SUPPORTED_HEAD_DIMS, check_qkv
from attnforge.environment import triton_interpret
from attnforge.kernels import tuning

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, KvLens, PartO, PartM, PartL, Counters,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2, kv_len, num_kv_heads,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    slot = tl.program_id(1)  # (batch, kv head, block of query rows)
    bh = slot // NUM_M_BLOCKS
    b = (bh // num_kv_heads).to(tl.int64)
    h = bh % num_kv_heads

    rows = (slot % NUM_M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = head_in_group * Q_LEN + token
    row_ok = rows < GROUP * Q_LEN
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM

    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qm + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    end = tl.load(KvLens + b).to(tl.int32) if HAS_KV_LENS else kv_len
    chunk = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    stop = tl.minimum(start + chunk, end)
    last_visible = end - Q_LEN + token  # bottom-right causal among the new tokens

    k_base = K + b * stride_kb + h.to(tl.int64) * stride_kh + d[None, :] * stride_kd
    v_base = V + b * stride_vb + h.to(tl.int64) * stride_vh + d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (n < end)[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vn, mask=kv_mask, other=0.0)
        if FP32_DOT:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
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

    o_ptrs = (
        Out + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_om + d[None, :] * stride_od
    )
    o_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    else:
        r = tl.arange(0, BLOCK_M)
        part = slot.to(tl.int64) * NUM_SPLITS + split
        tl.store(PartM + part * BLOCK_M + r, m_i)
        tl.store(PartL + part * BLOCK_M + r, l_i)
        tl.store(PartO + (part * BLOCK_M + r[:, None]) * D_BLOCK + d[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(Counters + slot, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            out = _merge_splits(PartO, PartM, PartL, slot, BLOCK_M, D_BLOCK, NUM_SPLITS, SPLITS_P2, S_CHUNK)
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
            tl.store(Counters + slot, 0)  # ready for the next launch (and the next graph replay)


@triton.jit
def _merge_splits(PartO, PartM, PartL, slot, BLOCK_M: tl.constexpr, D_BLOCK: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """Combine the NUM_SPLITS partials of one slot: `sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s`."""
    base = slot.to(tl.int64) * NUM_SPLITS
    r = tl.arange(0, BLOCK_M)
    s_all = tl.arange(0, SPLITS_P2)
    ml_offsets = (base + s_all[:, None]) * BLOCK_M + r[None, :]
    s_ok = (s_all < NUM_SPLITS)[:, None]
    m_all = tl.load(PartM + ml_offsets, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(PartL + ml_offsets, mask=s_ok, other=0.0, cache_modifier=".cg")
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_total = tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)

    d = tl.arange(0, D_BLOCK)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for s0 in tl.static_range(0, NUM_SPLITS, S_CHUNK):
        s = s0 + tl.arange(0, S_CHUNK)
        s_in = s < NUM_SPLITS
        m_offsets = (base + s[:, None]) * BLOCK_M + r[None, :]
        m_s = tl.load(PartM + m_offsets, mask=s_in[:, None], other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(m_s - m_safe[None, :])  # [S_CHUNK, BLOCK_M]
        o_offsets = ((base + s[:, None, None]) * BLOCK_M + r[None, :, None]) * D_BLOCK + d[None, None, :]
        o_s = tl.load(PartO + o_offsets, mask=s_in[:, None, None], other=0.0, cache_modifier=".cg")
        acc += tl.sum(weight[:, :, None] * o_s, 0)
    return acc / tl.where(l_total == 0.0, 1.0, l_total)[:, None]


# ------------------------------------------------------------------------------------------------------------
# Host side: validation, launch parameters, workspace, launch.


def _check_inputs(q, k, v, kv_lens, out) -> None:
    check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[3]} is not supported {SUPPORTED_HEAD_DIMS}")
    if not 1 <= q.shape[2] <= MAX_DECODE_QUERY_LEN:
        accepted = f"1..{MAX_DECODE_QUERY_LEN}"
        raise ValueError(f"q_len={q.shape[2]} is not supported by decode_attention ({accepted}); "
                         "use prefill_attention for longer queries")  # fmt: skip
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q_len={q.shape[2]} exceeds kv_len={k.shape[2]}: the new tokens must be in the cache"
        )
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor) or kv_lens.shape != (q.shape[0],):
            got = tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else type(kv_lens).__name__
            raise ValueError(f"kv_lens must be an integer tensor of shape [B]=({q.shape[0]},), got {got}")
        if kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_lens dtype {kv_lens.dtype} is not supported; accepted: int32, int64")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")  # fmt: skip


def decode_bucket(
    batch: int, kv_len: int, group: int, q_len: int, head_dim: int, has_kv_lens: bool = False
) -> str:
    """Shape bucket of the tuning table, e.g. 'd128-m4-b1-kv4k', or 'd128-m4-b1-kv32k-lens' with kv_lens
    (a static or ragged cache, where torch must mask the whole buffer)."""
    rows = group * q_len
    m = 1 if rows == 1 else min(64, triton.next_power_of_2(rows))
    b = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 10**9) if batch <= x)
    kv = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 10**9) if kv_len <= x * 1024)
    lens = "-lens" if has_kv_lens else ""
    return f"d{head_dim}-m{m}-b{b if b < 10**9 else 'max'}-kv{kv if kv < 10**9 else 'max'}k{lens}"


def _heuristic_params(batch: int, kv_len: int, num_kv_heads: int, m_blocks: int, sms: int) -> dict:
    """Split the cache so the grid fills whole waves of the GPU (a partial last wave doubles the time)."""
    block_n = 64
    slots = batch * num_kv_heads * m_blocks
    tiles = triton.cdiv(kv_len, block_n)
    if slots >= sms or tiles <= 1:
        return {"BLOCK_N": block_n, "num_splits": 1, "num_warps": 4, "num_stages": 3}
    # Two programs per SM; each split keeps at least 4 tiles so the loads pipeline.
    splits = max(1, min(2 * sms // slots, tiles // 4, 128))
    return {"BLOCK_N": block_n, "num_splits": splits, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=1024)
def _launch_params(
    shape: tuple, num_kv_heads: int, kv_len: int, has_kv_lens: bool, device: torch.device
) -> dict:
    """Launch parameters for q of `shape`: from the tuning table, else the heuristic (cached per shape)."""
    batch, num_heads, q_len, head_dim = shape
    rows = num_heads // num_kv_heads * q_len
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    bucket = decode_bucket(batch, kv_len, num_heads // num_kv_heads, q_len, head_dim, has_kv_lens)
    params = tuning.launch_params("decode", tuning.gpu_key(device), bucket)
    params = params or _heuristic_params(batch, kv_len, num_kv_heads, m_blocks, tuning.sm_count(device))
    return _with_valid_splits({**params, "BLOCK_M": block_m, "m_blocks": m_blocks}, kv_len)


def _with_valid_splits(params: dict, kv_len: int) -> dict:
    """No more splits than key tiles (a table entry may come from a longer cache in the same bucket)."""
    return {**params, "num_splits": max(1, min(params["num_splits"], triton.cdiv(kv_len, params["BLOCK_N"])))}


class _Workspace:
    """Per-device scratch for split partials and arrival counters, grown as needed and never freed.

    Never freeing keeps the pointers recorded in a captured CUDA graph valid; the counters return to zero
    after every launch. One decode call at a time per device (a single stream), as in a decode loop.
    """

    def __init__(self) -> None:
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, floats: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._by_device.get(device)
        if buffers is None or buffers[0].numel() < floats or buffers[1].numel() < slots:
            if buffers is not None:
                self._retired.extend(buffers)
            size = max(floats, 0 if buffers is None else buffers[0].numel())
            count = max(slots, 0 if buffers is None else buffers[1].numel())
            buffers = (torch.empty(size, dtype=torch.float32, device=device),
                       torch.zeros(count, dtype=torch.int32, device=device))  # fmt: skip
            self._by_device[device] = buffers
        return buffers


_WORKSPACE = _Workspace()


def _fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in full fp32 (not tf32). The CPU interpreter (triton 3.9) also needs it for bf16,
    whose tl.dot there reads raw bits as integers; on a GPU bf16/fp16 always use the tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpret())


def launch_decode(q, k, v, out, *, scale: float, kv_lens=None, params: dict | None = None) -> None:
    """Launch the kernel on validated inputs, writing `out`. `params` overrides the tuning table
    (keys BLOCK_N, num_splits, num_warps, num_stages): for tuning sweeps; users call decode_attention."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    p = _launch_params(tuple(q.shape), num_kv_heads, kv_len, kv_lens is not None, q.device)
    if params is not None:
        p = _with_valid_splits({**p, **params}, kv_len)
    splits, block_m, block_n, m_blocks = p["num_splits"], p["BLOCK_M"], p["BLOCK_N"], p["m_blocks"]
    d_block = triton.next_power_of_2(head_dim)
    slots = batch * num_kv_heads * m_blocks
    part_rows = slots * splits * block_m if splits > 1 else 1
    workspace, counters = _WORKSPACE.get(q.device, part_rows * (d_block + 2), slots)
    part_o = workspace[: part_rows * d_block]
    part_m = workspace[part_rows * d_block : part_rows * (d_block + 1)]
    part_l = workspace[part_rows * (d_block + 1) : part_rows * (d_block + 2)]
    splits_p2 = triton.next_power_of_2(splits)
    s_chunk = max(1, min(splits_p2, 8192 // (block_m * d_block)))
    lens = kv_lens if kv_lens is not None else counters  # any pointer; unread without HAS_KV_LENS
    _decode_kernel[(splits, slots)](
        q, k, v, out, lens, part_o, part_m, part_l, counters,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E, kv_len, num_kv_heads,
        GROUP=num_heads // num_kv_heads, Q_LEN=q_len, HEAD_DIM=head_dim, D_BLOCK=d_block,
        BLOCK_M=block_m, NUM_M_BLOCKS=m_blocks, BLOCK_N=block_n,
        NUM_SPLITS=splits, SPLITS_P2=splits_p2, S_CHUNK=s_chunk,
        HAS_KV_LENS=kv_lens is not None, FP32_DOT=_fp32_dot(q.dtype),
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile; capturable in CUDA graphs) and the public function.


@torch.library.custom_op("attnforge::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               kv_lens: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens)
    return out


@_decode_op.register_fake
def _(q, k, v, scale, kv_lens):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnforge::decode_attention_out", mutates_args=("out",))
def _decode_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   kv_lens: torch.Tensor | None, out: torch.Tensor) -> None:  # fmt: skip
    launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens)


@_decode_out_op.register_fake
def _(q, k, v, scale, kv_lens, out):
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache (GQA/MQA/MHA native, split-KV, one launch).

    Args:
        q: `[B, Hq, Lq, D]`, Lq in 1..16; causal among the new tokens, bottom-right aligned to the cache.
        k, v: `[B, Hkv, Lkv, D]`, any strides (e.g. a slice of a preallocated cache); Hq % Hkv == 0.
        scale: softmax scale, default 1/sqrt(D).
        kv_lens: int32/int64 `[B]` valid length per sequence (the new tokens are its last Lq positions);
            keys at or beyond it are never read. Default: all Lkv valid.
        out: optional `[B, Hq, Lq, D]` buffer written in place (no allocation, for CUDA-graph capture).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (`out` when given). D in 64, 80, 96, 128, 256; fp16/bf16/fp32.
    """
    _check_inputs(q, k, v, kv_lens, out)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    if not torch.compiler.is_compiling():  # eager: skip the dispatcher's overhead (~10 us a call)
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens)
        return out
    if out is None:
        return _decode_op(q, k, v, scale, kv_lens)
    _decode_out_op(q, k, v, scale, kv_lens, out)
    return out
