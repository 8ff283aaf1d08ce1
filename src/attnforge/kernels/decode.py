"""Decode attention: a few new query tokens against a long KV cache, GQA-packed, split-KV, one launch.

One program serves all Hq/Hkv query heads (times the Lq new tokens) of one KV head over one slice ("split") of
the valid keys, so keys and values are read once. The valid keys are shared evenly between the splits in
whole tiles, so a static cache (few valid keys in a long buffer) costs what a contiguous cache of its valid
length costs. Each split writes a partial (max, sum, unnormalized output) for its real rows only, then bumps a
per-slot arrival counter; the program that arrives last merges the partials, writes the output and resets the
counter. With one split the program writes the output directly.

Valid lengths are clamped to [0, Lkv] on the device: no value of `kv_lens` can make the kernel read outside
the cache, and there is no host sync. A left-padded batch passes `kv_starts` too (the first valid key per
sequence, clamped to [0, its length]): the splits share keys [start, end), and padding is never read.
"""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl

from attnforge.config import (
    MAX_DECODE_QUERY_LEN,
    SUPPORTED_HEAD_DIMS,
    check_lengths,
    check_qkv,
    resolve_scale,
)
from attnforge.environment import triton_interpret
from attnforge.kernels import temporary_workspaces, tuning, workspaces_are_temporary

try:  # grid dependency control (programmatic dependent launch), Hopper and later; newer Tritons only
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Upper bound of the split count (the merge's unrolled chunks are sized for it).
MAX_SPLITS = 128
# Shared memory the pipelined K/V tiles may take (Hopper has 227 KB per block; Ampere 163 KB).
SHARED_MEMORY_BUDGET = 160 * 1024
# Partial rows (splits x real rows) the heuristic lets the last program of a slot merge.
MERGE_ROWS = 256
# Splits a merge step unrolls (their loads in flight together); more would only grow the code.
MERGE_CHUNK = 16
# How split partials are merged: by the program that arrives last ("last", one launch), or by a second kernel
# with one program per (slot, row) ("kernel"), launched early with programmatic dependent launch on Hopper
# ("kernel-pdl"; without PDL support it runs as "kernel").
COMBINE_MODES = ("last", "kernel", "kernel-pdl")


# One kernel body on purpose (~90 lines, over the 60-line rule): Triton inlines helpers anyway, and
# keeping the split's loop, its partial write and the merge in one place keeps the pointer flow readable.
@triton.jit
def _decode_kernel(
    Q, K, V, Out, KvLens, KvStarts, PartO, PartML, Counters,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2, kv_len, num_kv_heads, num_splits,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_KV_STARTS: tl.constexpr, FP32_DOT: tl.constexpr,
    MERGE_LAST: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # One function on purpose (kernels are exempt from the 60-line rule): load, the online-softmax loop over
    # this split's keys, then the output or the partial and, with MERGE_LAST, the last program's merge.
    if USE_PDL:  # the combine kernel may start launching now; it waits for this grid before reading
        gdc_launch_dependents()
    split = tl.program_id(0)
    slot = tl.program_id(1)  # (batch, kv head, block of query rows)
    bh = slot // NUM_M_BLOCKS
    m_block = slot % NUM_M_BLOCKS
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)

    # Row = head_in_group * Q_LEN + token: the G heads times the Lq new tokens share one read of K and V.
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Q_LEN
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qm + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if HAS_KV_LENS:  # noqa: SIM108 - clamped on the device in its own dtype: never outside the buffer
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    else:
        end = kv_len
    if HAS_KV_STARTS:  # noqa: SIM108 - left padding: keys before the first valid one are never read
        first = tl.minimum(tl.maximum(tl.load(KvStarts + b), 0), end).to(tl.int32)
    else:
        first = 0
    tiles_per_split = tl.cdiv(tl.cdiv(end - first, BLOCK_N), num_splits)
    start = first + split * tiles_per_split * BLOCK_N
    stop = tl.minimum(start + tiles_per_split * BLOCK_N, end)
    last_visible = end - Q_LEN + token  # bottom-right causal among the new tokens; also hides n >= end

    n_off = tl.arange(0, BLOCK_N)
    # K is read as [D, BLOCK_N] (transposed pointers) so the dot needs no transpose; V as [BLOCK_N, D].
    n_first = start.to(tl.int64) + n_off
    kt_ptrs = K + b * stride_kb + h * stride_kh + d[:, None] * stride_kd + n_first[None, :] * stride_kn
    v_ptrs = V + b * stride_vb + h * stride_vh + n_first[:, None] * stride_vn + d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + n_off
        n_ok = n < end
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
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

    if not SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = (
            Out + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_om
            + d[None, :] * stride_od
        )  # fmt: skip
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partials of the real rows only: [slot, split, PART_ROWS, (o, m), D_BLOCK] and
        # [slot, split, (m, l), PART_ROWS].
        r = tl.arange(0, BLOCK_M)
        keep = r < PART_ROWS
        part = slot.to(tl.int64) * num_splits + split
        tl.store(PartML + part * 2 * PART_ROWS + r, m_i, mask=keep)
        tl.store(PartML + part * 2 * PART_ROWS + PART_ROWS + r, l_i, mask=keep)
        # Each partial row is its output followed by its max repeated over D (`_merge_rows` reads the two with
        # the same layout: no per-split exchange between threads).
        o_row = PartO + (part * PART_ROWS + r[:, None]) * (2 * D_BLOCK) + d[None, :]
        tl.store(o_row, acc, mask=keep[:, None])
        tl.store(o_row + D_BLOCK, tl.broadcast_to(m_i[:, None], [BLOCK_M, D_BLOCK]), mask=keep[:, None])
        if MERGE_LAST:
            _merge_if_last(Out, PartO, PartML, Counters, slot, b, h, m_block, d, d_ok, stride_ob, stride_oh,
                           stride_om, stride_od, num_splits, GROUP, Q_LEN, D_BLOCK, BLOCK_M, SPLITS_P2,
                           PART_ROWS, S_CHUNK)  # fmt: skip


@triton.jit
def _merge_if_last(Out, PartO, PartML, Counters, slot, b, h, m_block, d, d_ok, stride_ob, stride_oh,
                   stride_om, stride_od, num_splits, GROUP: tl.constexpr, Q_LEN: tl.constexpr,
                   D_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS_P2: tl.constexpr,
                   PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """Count this split's arrival; the program that arrives last merges the slot's partials into the output
    and resets the counter (for the next launch and the next graph replay)."""
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    arrived = tl.atomic_add(Counters + slot, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        out = _merge_rows(PartO, PartML, slot.to(tl.int64) * num_splits, num_splits, tl.arange(0, PART_ROWS),
                          PART_ROWS, SPLITS_P2, PART_ROWS, D_BLOCK, S_CHUNK)  # fmt: skip
        part_rows = m_block * BLOCK_M + tl.arange(0, PART_ROWS)
        part_head = h * GROUP + part_rows // Q_LEN
        part_token = part_rows % Q_LEN
        o_ptrs = (
            Out + b * stride_ob + part_head[:, None] * stride_oh + part_token[:, None] * stride_om
            + d[None, :] * stride_od
        )  # fmt: skip
        o_mask = (part_rows < GROUP * Q_LEN)[:, None] & d_ok[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
        tl.store(Counters + slot, 0)


@triton.jit
def _combine_kernel(
    Out, PartO, PartML, stride_ob, stride_oh, stride_om, stride_od, num_kv_heads, num_splits,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr,
    S_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """The second launch of the two-kernel variant: one program per (slot, partial row) merges that row's
    partials from every split (many programs: the merge is not one program's serial tail)."""
    if USE_PDL:  # launched early (programmatic dependent launch): wait until the split kernel has finished
        gdc_wait()
    pid = tl.program_id(0)
    slot, r = pid // PART_ROWS, pid % PART_ROWS
    rows = (slot % NUM_M_BLOCKS) * BLOCK_M + r + tl.arange(0, 1)
    bh = slot // NUM_M_BLOCKS
    b, h = (bh // num_kv_heads).to(tl.int64), (bh % num_kv_heads).to(tl.int64)
    out = _merge_rows(PartO, PartML, slot.to(tl.int64) * num_splits, num_splits, r + tl.arange(0, 1),
                      1, SPLITS_P2, PART_ROWS, D_BLOCK, S_CHUNK)  # fmt: skip
    d = tl.arange(0, D_BLOCK)
    o_ptrs = (
        Out + b * stride_ob + (h * GROUP + rows // Q_LEN)[:, None] * stride_oh
        + (rows % Q_LEN)[:, None] * stride_om + d[None, :] * stride_od
    )  # fmt: skip
    o_mask = (rows < GROUP * Q_LEN)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_rows(PartO, PartML, base, num_splits, r, ROWS: tl.constexpr, SPLITS_P2: tl.constexpr,
                PART_ROWS: tl.constexpr, D_BLOCK: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """Combine partial rows `r` ([ROWS] indices < PART_ROWS) of the splits at `base`:
    `sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s`, `[ROWS, D_BLOCK]`. Each thread accumulates its own
    elements split after split, with S_CHUNK splits' loads in flight, reading each split's max from the copy
    stored next to its output (same layout: nothing moves between threads per split; a reduction over a
    tile's split axis compiled to thousands of shared-memory steps)."""
    s_all = tl.arange(0, SPLITS_P2)
    ml_all = (base + s_all[:, None]) * 2 * PART_ROWS + r[None, :]
    s_ok = (s_all < num_splits)[:, None]
    m_all = tl.load(PartML + ml_all, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(PartML + ml_all + PART_ROWS, mask=s_ok, other=0.0, cache_modifier=".cg")
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_total = tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)
    row = r[:, None] * (2 * D_BLOCK) + tl.arange(0, D_BLOCK)[None, :]
    acc = tl.zeros([ROWS, D_BLOCK], tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        for i in tl.static_range(S_CHUNK):  # independent loads: in flight together
            ok = ((r < PART_ROWS) & (r * 0 + s0 + i < num_splits))[:, None]
            o_ptrs = PartO + (base + s0 + i) * (PART_ROWS * 2 * D_BLOCK) + row
            o_s = tl.load(o_ptrs, mask=ok, other=0.0, cache_modifier=".cg")
            m_s = tl.load(o_ptrs + D_BLOCK, mask=ok, other=float("-inf"), cache_modifier=".cg")
            acc += tl.exp2(m_s - m_safe[:, None]) * o_s
    return acc / tl.where(l_total == 0.0, 1.0, l_total)[:, None]


# ------------------------------------------------------------------------------------------------------------
# Host side: validation, launch parameters, workspace, launch.


def _check_inputs(q, k, v, kv_lens, kv_starts, out) -> None:
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
    check_lengths("kv_lens", kv_lens, q.shape[0], q.device)
    check_lengths("kv_starts", kv_starts, q.shape[0], q.device)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")  # fmt: skip


def decode_bucket(
    batch: int, kv_len: int, group: int, q_len: int, head_dim: int, has_kv_lens: bool = False
) -> str:
    """Shape bucket of the tuning store, e.g. 'd128-m4-b1-kv4k'; '-lq4' for 3-4 new tokens (torch then needs a
    causal mask: another race), '-lens' with kv_lens (a static or ragged cache: torch masks the whole buffer).
    """
    rows = group * q_len
    m = 1 if rows == 1 else min(64, triton.next_power_of_2(rows))
    b = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 10**9) if batch <= x)
    kv = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 10**9) if kv_len <= x * 1024)
    lq = f"-lq{triton.next_power_of_2(q_len)}" if q_len > 1 else ""
    lens = "-lens" if has_kv_lens else ""
    return f"d{head_dim}-m{m}-b{b if b < 10**9 else 'max'}-kv{kv if kv < 10**9 else 'max'}k{lq}{lens}"


def heuristic_splits(units: int, tiles: int, sms: int) -> int:
    """Split count for `units` (batch x kv heads x row blocks) programs over `tiles` key tiles: as many splits
    as fit in one wave of the GPU (one program per SM), at most one per tile and MAX_SPLITS."""
    return max(1, min(sms // max(units, 1), tiles, MAX_SPLITS))


def heuristic_params(
    batch: int, kv_len: int, num_kv_heads: int, rows: int, head_dim: int, elem_bytes: int, sms: int
) -> dict:
    """Launch parameters without a tuning entry: 128-key tiles (fewer where a K+V tile would pass 64 KB),
    as many pipeline stages (up to 3) as fit in 160 KB of shared memory, and splits that fill one wave,
    capped so that the last program merges at most MERGE_ROWS partial rows (the merge is its tail)."""
    row_bytes = triton.next_power_of_2(head_dim) * elem_bytes
    block_n = max(16, min(128, 32768 // row_bytes))
    stages = max(2, min(3, SHARED_MEMORY_BUDGET // (2 * block_n * row_bytes)))
    block_m = default_block_m(rows)
    part_rows = min(block_m, triton.next_power_of_2(rows))
    units = batch * num_kv_heads * triton.cdiv(rows, block_m)
    splits = heuristic_splits(units, triton.cdiv(kv_len, block_n), sms)
    splits = max(1, min(splits, MERGE_ROWS // part_rows))
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_splits": splits,
        "num_warps": 4,
        "num_stages": stages,
    }


def default_block_m(rows: int) -> int:
    """Query rows per program: all G x Lq rows of a KV head up to 64 (one read of K/V for all of them)."""
    return max(16, min(64, triton.next_power_of_2(rows)))


@functools.lru_cache(maxsize=4096)
def _launch_params(
    shape: tuple, num_kv_heads: int, kv_len: int, has_kv_lens: bool, dtype: torch.dtype, device: torch.device
) -> dict:
    """Launch parameters for q of `shape`: from the tuning store, else the heuristic (cached per shape)."""
    batch, num_heads, q_len, head_dim = shape
    rows = num_heads // num_kv_heads * q_len
    bucket = decode_bucket(batch, kv_len, num_heads // num_kv_heads, q_len, head_dim, has_kv_lens)
    params = tuning.launch_params("decode", device, bucket)
    if params is None:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        params = heuristic_params(
            batch, kv_len, num_kv_heads, rows, head_dim, elem_bytes, tuning.sm_count(device)
        )
    return _launch_constants(complete_params(params, rows, kv_len), shape, num_kv_heads, dtype, device)


tuning.on_reload(_launch_params.cache_clear)


def _launch_constants(p: dict, shape: tuple, num_kv_heads: int, dtype: torch.dtype, device) -> dict:
    """`p` (complete parameters) plus every constant of the launch that follows from them and the call's
    sizes: computed once per shape (`_launch_params` caches it), since each line costs host time per call."""
    batch, num_heads, _, head_dim = shape
    combine = p.get("combine", "last")
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine={combine!r} is not one of {COMBINE_MODES}")
    splits, part_rows = p["num_splits"], p["part_rows"]
    d_block, splits_p2 = triton.next_power_of_2(head_dim), triton.next_power_of_2(splits)
    slots = batch * num_kv_heads * p["m_blocks"]
    return {
        **p,
        "combine": combine,
        "group": num_heads // num_kv_heads,
        "d_block": d_block,
        "splits_p2": splits_p2,
        "slots": slots,  # programs per split, and arrival counters
        # partials: (O, m repeated) per row, then (m, l)
        "floats": 1 if splits == 1 else slots * splits * part_rows * (2 * d_block + 2),
        "part_o_floats": slots * splits * part_rows * 2 * d_block,
        # splits whose partials one merge step loads at once: at most 64 floats per thread (4 warps)
        "s_chunk": max(1, min(splits_p2, MERGE_CHUNK, 4096 // (part_rows * d_block))),
        "combine_s_chunk": max(1, min(splits_p2, MERGE_CHUNK)),
        "use_pdl": combine == "kernel-pdl" and splits > 1 and pdl_supported(torch.device(device)),
        "fp32_dot": _fp32_dot(dtype),
    }


def complete_params(params: dict, rows: int, kv_len: int) -> dict:
    """Tunable parameters (BLOCK_M optional, BLOCK_N, num_splits, num_warps, num_stages) plus what the launch
    derives: row blocks, splits within [1, tiles] (an entry may come from a longer cache in its bucket), the
    partial rows per split."""
    block_m = int(params.get("BLOCK_M") or default_block_m(rows))
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M={block_m} must be a power of two >= 16")
    splits = max(1, min(int(params["num_splits"]), triton.cdiv(kv_len, params["BLOCK_N"]), MAX_SPLITS))
    part_rows = min(block_m, triton.next_power_of_2(rows))
    derived = {
        "BLOCK_M": block_m,
        "m_blocks": triton.cdiv(rows, block_m),
        "rows": rows,
        "part_rows": part_rows,
    }
    return {**params, **derived, "num_splits": splits}


class DecodeWorkspace:
    """Scratch for split-KV decode calls: partials (float32) and arrival counters (int32, zero between calls).

    One workspace serves one stream of calls at a time: calls that may run concurrently (two streams, two
    CUDA graphs replayed side by side) need their own. Pass one to `decode_attention(..., workspace=)` to own
    it (e.g. one per captured graph); without one, each stream gets its own (see `default_workspace`).
    Buffers only grow; grown-out buffers stay alive, so pointers recorded in a captured graph stay valid.
    """

    def __init__(self, device: torch.device | str, partial_floats: int = 0, counters: int = 0) -> None:
        self.device = torch.device(device)
        self.partials = torch.empty(max(partial_floats, 1), dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(max(counters, 1), dtype=torch.int32, device=self.device)
        self._retired: list[torch.Tensor] = []

    def buffers(self, partial_floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(partials, counters) of at least these sizes; grows (outside graph capture only)."""
        if self.partials.numel() < partial_floats or self.counters.numel() < counters:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"decode workspace too small during CUDA-graph capture: needs {partial_floats} partial "
                    f"floats and {counters} counters, has {self.partials.numel()} and "
                    f"{self.counters.numel()}; size it before capture (DecodeWorkspace.for_call)"
                )
            self._retired += [self.partials, self.counters]
            self.partials = torch.empty(
                max(partial_floats, self.partials.numel()), dtype=torch.float32, device=self.device
            )
            self.counters = torch.zeros(
                max(counters, self.counters.numel()), dtype=torch.int32, device=self.device
            )
        return self.partials, self.counters

    @classmethod
    def for_call(cls, q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None = None):
        """A workspace large enough for `decode_attention(q, k, v, kv_lens=...)` with these shapes."""
        return cls(q.device, *workspace_size(q, k, kv_lens))


def workspace_size(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None = None) -> tuple[int, int]:
    """(partial floats, counters) a call with q `[B, Hq, Lq, D]` and k `[B, Hkv, Lkv, D]` needs."""
    p = _launch_params(tuple(q.shape), k.shape[1], k.shape[2], kv_lens is not None, q.dtype, q.device)
    return p["floats"], p["slots"]


_DEFAULT_WORKSPACES: dict[tuple, DecodeWorkspace] = {}
_WORKSPACE_LOCK = threading.Lock()


def default_workspace(device: torch.device, partial_floats: int, counters: int) -> DecodeWorkspace:
    """The workspace a call without `workspace=` uses: one per (device, stream) in eager mode; a new one per
    call during CUDA-graph capture and inside `temporary_workspaces()` (torch.compile's ops): a temporary like
    any operator's, freed when the call returns (in a graph, its counters are zeroed at every replay)."""
    if workspaces_are_temporary() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return DecodeWorkspace(device, partial_floats, counters)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    with _WORKSPACE_LOCK:
        workspace = _DEFAULT_WORKSPACES.get(key)
        if workspace is None:
            workspace = _DEFAULT_WORKSPACES[key] = DecodeWorkspace(device, partial_floats, counters)
    return workspace


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper (sm90+) GPU, not the interpreter, and a Triton that has it."""
    if triton_interpret() or device.type != "cuda" or gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and torch.cuda.get_device_capability(device)[0] >= 9


def _fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in full fp32 (not tf32). The CPU interpreter (triton 3.9) also needs it for bf16,
    whose tl.dot there reads raw bits as integers; on a GPU bf16/fp16 always use the tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpret())


def launch_decode(
    q, k, v, out, *, scale: float, kv_lens=None, kv_starts=None, params: dict | None = None, workspace=None
) -> None:
    """Launch the kernel on validated inputs, writing `out`. `params` overrides the tuning table
    (keys BLOCK_M optional, BLOCK_N, num_splits, num_warps, num_stages, combine optional): for tuning sweeps;
    users call decode_attention."""
    shape, num_kv_heads, kv_len = tuple(q.shape), k.shape[1], k.shape[2]
    p = _launch_params(shape, num_kv_heads, kv_len, kv_lens is not None, q.dtype, q.device)
    if params is not None:
        p = complete_params({**p, **params, "BLOCK_M": params.get("BLOCK_M")}, p["rows"], kv_len)
        p = _launch_constants(p, shape, num_kv_heads, q.dtype, q.device)
    splits, slots = p["num_splits"], p["slots"]
    workspace = workspace or default_workspace(q.device, p["floats"], slots)
    partials, counters = workspace.buffers(p["floats"], slots)
    # The kernel reads lengths[b] at pointer + b: a view (a column of a [B, 2] tensor) is made contiguous.
    lens = kv_lens.contiguous() if kv_lens is not None else counters  # unread without HAS_KV_LENS
    starts = kv_starts.contiguous() if kv_starts is not None else counters  # unread without HAS_KV_STARTS
    merge_o = partials[p["part_o_floats"] :] if splits > 1 else partials
    pdl = {"launch_pdl": True} if p["use_pdl"] else {}
    _decode_kernel[(splits, slots)](
        q, k, v, out, lens, starts, partials, merge_o, counters,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E, kv_len, num_kv_heads, splits,
        GROUP=p["group"], Q_LEN=shape[2], HEAD_DIM=shape[3], D_BLOCK=p["d_block"],
        BLOCK_M=p["BLOCK_M"], NUM_M_BLOCKS=p["m_blocks"], BLOCK_N=p["BLOCK_N"],
        SPLIT=splits > 1, SPLITS_P2=p["splits_p2"], PART_ROWS=p["part_rows"], S_CHUNK=p["s_chunk"],
        HAS_KV_LENS=kv_lens is not None, HAS_KV_STARTS=kv_starts is not None, FP32_DOT=p["fp32_dot"],
        MERGE_LAST=p["combine"] == "last", USE_PDL=p["use_pdl"], num_warps=p["num_warps"],
        num_stages=p["num_stages"], **pdl,
    )  # fmt: skip
    if splits > 1 and p["combine"] != "last":
        _combine_kernel[(slots * p["part_rows"],)](
            out, partials, merge_o, *out.stride(), num_kv_heads, splits,
            GROUP=p["group"], Q_LEN=shape[2], HEAD_DIM=shape[3], D_BLOCK=p["d_block"],
            BLOCK_M=p["BLOCK_M"], NUM_M_BLOCKS=p["m_blocks"], SPLITS_P2=p["splits_p2"],
            PART_ROWS=p["part_rows"], S_CHUNK=p["combine_s_chunk"], USE_PDL=p["use_pdl"], num_warps=4,
            num_stages=2, **pdl,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile; capturable in CUDA graphs) and the public function.


@torch.library.custom_op("attnforge::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               kv_lens: torch.Tensor | None, kv_starts: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    with temporary_workspaces():
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts)
    return out


@_decode_op.register_fake
def _(q, k, v, scale, kv_lens, kv_starts):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnforge::decode_attention_out", mutates_args=("out",))
def _decode_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   kv_lens: torch.Tensor | None, kv_starts: torch.Tensor | None,
                   out: torch.Tensor) -> None:  # fmt: skip
    with temporary_workspaces():
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts)


@_decode_out_op.register_fake
def _(q, k, v, scale, kv_lens, kv_starts, out):
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache (GQA/MQA/MHA native, split-KV, one launch).

    Args:
        q: `[B, Hq, Lq, D]`, Lq in 1..16; causal among the new tokens, bottom-right aligned to the cache.
        k, v: `[B, Hkv, Lkv, D]`, any strides (e.g. a slice of a preallocated cache); Hq % Hkv == 0.
        scale: softmax scale (a finite number > 0), default 1/sqrt(D).
        kv_lens: int32/int64 `[B]` valid length per sequence (the new tokens are its last Lq positions);
            keys at or beyond it are never read. Values are clamped to [0, Lkv] on the GPU (no host sync):
            a length above Lkv reads the whole cache, a negative one reads nothing (output 0).
        kv_starts: int32/int64 `[B]` first valid key per sequence (a left-padded batch): keys before it are
            never read. Clamped to [0, valid length] on the GPU; default 0.
        out: optional `[B, Hq, Lq, D]` buffer written in place (no allocation, for CUDA-graph capture).
        workspace: optional DecodeWorkspace owned by the caller (one per concurrently running stream or
            graph); default: one per stream, and a fresh one per call while a CUDA graph is captured.

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (`out` when given). D in 64, 80, 96, 128, 256; fp16/bf16/fp32.
    """
    _check_inputs(q, k, v, kv_lens, kv_starts, out)
    scale = resolve_scale(scale, q.shape[3])
    if not torch.compiler.is_compiling():  # eager: skip the dispatcher's overhead (~10 us a call)
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts, workspace=workspace)
        return out
    if out is None:
        return _decode_op(q, k, v, scale, kv_lens, kv_starts)
    _decode_out_op(q, k, v, scale, kv_lens, kv_starts, out)
    return out
