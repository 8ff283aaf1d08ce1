"""Split-KV decode's device functions, shared by the decode kernels (`decode.py`, `decode_step.py`).

A program serves the G query heads of one KV head over one slice ("split") of the valid keys: `split_range`
shares the keys between the splits in whole tiles, `attend` runs the online softmax over a split's keys, and
`finish_split` writes the output (one split) or the split's partial (max, sum, unnormalized output), which the
program that arrives last merges (`merge_if_last`) or a second kernel merges (`combine_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnforge.kernels.pdl import gdc_wait


@triton.jit
def split_range(first, end, split, num_splits, BLOCK_N: tl.constexpr, ALONE_TILES: tl.constexpr):
    """This split's keys [start, stop) of the valid [first, end), in whole tiles shared evenly; `alone`: so
    few tiles that split 0 reads them all (the other splits' ranges are empty)."""
    n_tiles = tl.cdiv(end - first, BLOCK_N)
    alone = n_tiles <= ALONE_TILES
    tiles_per_split = tl.where(alone, n_tiles, tl.cdiv(n_tiles, num_splits))
    start = first + split * tiles_per_split * BLOCK_N
    stop = tl.minimum(start + tiles_per_split * BLOCK_N, end)
    return alone, start, stop


@triton.jit
def attend(q, K, V, start, stop, end, last_visible, scale_log2, d, d_ok, stride_kn, stride_kd, stride_vn,
           stride_vd, BLOCK_M: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
           FP32_DOT: tl.constexpr, kv_b, kv_h, USE_TMA: tl.constexpr):  # fmt: skip
    """Online softmax (base 2) of q `[BLOCK_M, D_BLOCK]` over the keys [start, stop) of one head's K and V
    (pointers at its first key; with USE_TMA, 4-d descriptors of `[B, Hkv, Lkv, D]` read at batch `kv_b`,
    head `kv_h`), keys at or beyond `end` masked and each row seeing keys up to its `last_visible`
    `[BLOCK_M]`: the running max `m`, sum `l` and unnormalized output `acc`. Through TMA, a tile that would
    pass `end` is read shifted back to end there (coordinates below 0 read as zeros) and its keys before the
    tile's own first one are masked: no key at or past `end` is read."""
    n_off = tl.arange(0, BLOCK_N)
    if not USE_TMA:  # K is read as [D, BLOCK_N] (transposed pointers): the dot needs no transpose
        n_first = start.to(tl.int64) + n_off
        kt_ptrs = K + d[:, None] * stride_kd + n_first[None, :] * stride_kn
        v_ptrs = V + n_first[:, None] * stride_vn + d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        if USE_TMA:
            at = tl.minimum(n0, end - BLOCK_N)
            kt = K.load([kv_b, kv_h, at, 0]).reshape(BLOCK_N, D_BLOCK).trans()
            v = V.load([kv_b, kv_h, at, 0]).reshape(BLOCK_N, D_BLOCK)
            n = at + n_off
            seen = (n >= n0)[None, :] & (n[None, :] <= last_visible[:, None])
        else:
            n = n0 + n_off
            n_ok = n < end
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            kt_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            seen = n[None, :] <= last_visible[:, None]
        if FP32_DOT:
            qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(seen, qk * scale_log2, float("-inf"))
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
    return m_i, l_i, acc


@triton.jit
def finish_split(o_ptrs, acc, l_i, m_i, Out, PartO, Counters, split, alone, slot, b, h, m_block, d, d_ok,
                 row_ok, stride_ob, stride_oh, stride_om, stride_od, num_splits, ml_offset,
                 GROUP: tl.constexpr, Q_LEN: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 SPLIT: tl.constexpr,
                 SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr,
                 MERGE_LAST: tl.constexpr, MERGE_LO: tl.constexpr):  # fmt: skip
    """A split's result: the output rows at `o_ptrs` (one split, or split 0 of an `alone` slot), else its
    partial and, with MERGE_LAST, the merge by the program that arrives last (in two parts where MERGE_LO,
    the second part's rows, is not 0: `merge_if_last`)."""
    if not SPLIT:
        store_rows(o_ptrs, acc, l_i, d, row_ok, d_ok, stride_od)
    elif alone:  # the other splits read nothing and write nothing; the slot's counter stays at zero
        if split == 0:
            store_rows(o_ptrs, acc, l_i, d, row_ok, d_ok, stride_od)
    else:
        # Partials in [slot, split, PART_ROWS, D_BLOCK] (the unnormalized output) and [slot, split, (m, l),
        # PART_ROWS], written for the real rows only (5 of 8 for GQA 5:1; the merge reads no more).
        r = tl.arange(0, BLOCK_M)
        keep = (r < PART_ROWS) & row_ok
        PartML = PartO + ml_offset
        part = slot.to(tl.int64) * num_splits + split
        tl.store(PartML + part * 2 * PART_ROWS + r, m_i, mask=keep)
        tl.store(PartML + part * 2 * PART_ROWS + PART_ROWS + r, l_i, mask=keep)
        o_row = PartO + (part * PART_ROWS + r[:, None]) * D_BLOCK + d[None, :]
        tl.store(o_row, acc, mask=keep[:, None])
        if MERGE_LAST:
            merge_if_last(Out, PartO, PartML, Counters, slot, b, h, m_block, d, d_ok, stride_ob, stride_oh,
                          stride_om, stride_od, num_splits, GROUP, Q_LEN, D_BLOCK, BLOCK_M, SPLITS_P2,
                          PART_ROWS, S_CHUNK, MERGE_LO)  # fmt: skip


@triton.jit
def store_rows(o_ptrs, acc, l_i, d, row_ok, d_ok, stride_od):
    """Write the normalized output of the rows at `o_ptrs` (`[BLOCK_M]` row pointers; acc `[BLOCK_M, D]`)."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    tl.store(o_ptrs[:, None] + d[None, :] * stride_od, out.to(o_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def merge_if_last(Out, PartO, PartML, Counters, slot, b, h, m_block, d, d_ok, stride_ob, stride_oh,
                   stride_om, stride_od, num_splits, GROUP: tl.constexpr, Q_LEN: tl.constexpr,
                   D_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS_P2: tl.constexpr,
                   PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr, MERGE_LO: tl.constexpr):  # fmt: skip
    """Count this split's arrival; the program that arrives last merges the slot's partials into the output
    and resets the counter (for the next launch and the next graph replay). MERGE_LO > 0: a slot of one row
    block whose real rows are no power of two (`decode_params.merge_lo_rows`: GQA 5:1, 5 rows of 8) is
    merged in two parts, half the partial rows and the next MERGE_LO, so that rows no split wrote take no
    registers and the loads of a step stay together (sm_90, 16 splits: in two runs, the maxima's and the
    rows', as for GQA 4:1, where all 8 rows took seven: `cpu/decode-sass/merge-parts-*` of the results)."""
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    arrived = tl.atomic_add(Counters + slot, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        base = slot.to(tl.int64) * num_splits
        strides = (stride_ob, stride_oh, stride_om, stride_od)
        if MERGE_LO > 0:
            HI: tl.constexpr = PART_ROWS // 2  # all real
            r_hi, r_lo = tl.arange(0, HI), HI + tl.arange(0, MERGE_LO)
            out_hi, out_lo = merge_two_parts(PartO, PartML, base, num_splits, r_hi, r_lo, GROUP * Q_LEN,
                                             SPLITS_P2, PART_ROWS, D_BLOCK, S_CHUNK)  # fmt: skip
            store_merged(Out, out_hi, r_hi, b, h, d, d_ok, strides, GROUP, Q_LEN)
            store_merged(Out, out_lo, r_lo, b, h, d, d_ok, strides, GROUP, Q_LEN)
        else:
            real = GROUP * Q_LEN - m_block * BLOCK_M  # this block's real rows (more than PART_ROWS: all)
            r = tl.arange(0, PART_ROWS)
            out = merge_rows(PartO, PartML, base, num_splits, r, real, PART_ROWS, SPLITS_P2, PART_ROWS,
                             D_BLOCK, S_CHUNK)  # fmt: skip
            store_merged(Out, out, m_block * BLOCK_M + r, b, h, d, d_ok, strides, GROUP, Q_LEN)
        tl.store(Counters + slot, 0)


@triton.jit
def store_merged(Out, out, rows, b, h, d, d_ok, strides, GROUP: tl.constexpr, Q_LEN: tl.constexpr):
    """Write merged output `[R, D_BLOCK]` of the slot's `rows` `[R]` (row = head_in_group * Q_LEN + token;
    rows past G x Lq are not written); `strides`: Out's (batch, head, token, dim)."""
    stride_ob, stride_oh, stride_om, stride_od = strides
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    o_ptrs = (
        Out + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_om + d[None, :] * stride_od
    )  # fmt: skip
    o_mask = (rows < GROUP * Q_LEN)[:, None] & d_ok[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit
def combine_kernel(
    Out, PartO, stride_ob, stride_oh, stride_om, stride_od, num_kv_heads, num_splits, ml_offset,
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
    base = slot.to(tl.int64) * num_splits
    real = GROUP * Q_LEN - (slot % NUM_M_BLOCKS) * BLOCK_M
    out = merge_rows(PartO, PartO + ml_offset, base, num_splits, r + tl.arange(0, 1), real, 1, SPLITS_P2,
                     PART_ROWS, D_BLOCK, S_CHUNK)  # fmt: skip
    d = tl.arange(0, D_BLOCK)
    o_ptrs = (
        Out + b * stride_ob + (h * GROUP + rows // Q_LEN)[:, None] * stride_oh
        + (rows % Q_LEN)[:, None] * stride_om + d[None, :] * stride_od
    )  # fmt: skip
    o_mask = (rows < GROUP * Q_LEN)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit
def merge_rows(PartO, PartML, base, num_splits, r, real, ROWS: tl.constexpr, SPLITS_P2: tl.constexpr,
               PART_ROWS: tl.constexpr, D_BLOCK: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """Combine partial rows `r` ([ROWS] indices < PART_ROWS) of the splits at `base`, reading those below
    `real` (the rows the splits wrote; the others come out 0):
    `sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s`, `[ROWS, D_BLOCK]`. Each thread accumulates its own
    elements split after split, with S_CHUNK splits' loads in flight (each a round trip to L2), reading each
    split's max per row beside its output rows (a reduction over a tile's split axis compiled to thousands
    of shared-memory steps)."""
    m_all, l_all = _row_stats(PartML, base, num_splits, r, real, SPLITS_P2, PART_ROWS)
    m_safe, l_total = _totals(m_all, l_all)
    acc = tl.zeros([ROWS, D_BLOCK], tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        for i in tl.static_range(S_CHUNK):  # independent loads: in flight together
            o_s, m_s = _split_rows(PartO, PartML, base, s0, i, num_splits, r, real, PART_ROWS, D_BLOCK)
            acc += tl.exp2(m_s - m_safe[:, None]) * o_s
    return acc / tl.where(l_total == 0.0, 1.0, l_total)[:, None]


@triton.jit
def merge_two_parts(PartO, PartML, base, num_splits, r_hi, r_lo, real, SPLITS_P2: tl.constexpr,
                    PART_ROWS: tl.constexpr, D_BLOCK: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """`merge_rows` of two row sets at once (`r_hi` all real, `r_lo` real below `real`), their loads in the
    same steps: `([len(r_hi), D_BLOCK], [len(r_lo), D_BLOCK])`, each row as `merge_rows` gives it."""
    stats_hi = _row_stats(PartML, base, num_splits, r_hi, real, SPLITS_P2, PART_ROWS)
    stats_lo = _row_stats(PartML, base, num_splits, r_lo, real, SPLITS_P2, PART_ROWS)  # in flight together
    m_hi, l_hi = _totals(stats_hi[0], stats_hi[1])
    m_lo, l_lo = _totals(stats_lo[0], stats_lo[1])
    acc_hi = tl.zeros([r_hi.shape[0], D_BLOCK], tl.float32)
    acc_lo = tl.zeros([r_lo.shape[0], D_BLOCK], tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        for i in tl.static_range(S_CHUNK):  # independent loads: in flight together
            o_hi, mx_hi = _split_rows(PartO, PartML, base, s0, i, num_splits, r_hi, real, PART_ROWS, D_BLOCK)
            o_lo, mx_lo = _split_rows(PartO, PartML, base, s0, i, num_splits, r_lo, real, PART_ROWS, D_BLOCK)
            acc_hi += tl.exp2(mx_hi - m_hi[:, None]) * o_hi
            acc_lo += tl.exp2(mx_lo - m_lo[:, None]) * o_lo
    out_hi = acc_hi / tl.where(l_hi == 0.0, 1.0, l_hi)[:, None]
    return out_hi, acc_lo / tl.where(l_lo == 0.0, 1.0, l_lo)[:, None]


@triton.jit
def _row_stats(PartML, base, num_splits, r, real, SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr):
    """Every split's max and sum of rows `r`: `([SPLITS_P2, R], [SPLITS_P2, R])` (-inf and 0 where absent)."""
    s_all = tl.arange(0, SPLITS_P2)
    ml_all = (base + s_all[:, None]) * 2 * PART_ROWS + r[None, :]
    s_ok = (s_all < num_splits)[:, None] & (r < real)[None, :]
    m_all = tl.load(PartML + ml_all, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(PartML + ml_all + PART_ROWS, mask=s_ok, other=0.0, cache_modifier=".cg")
    return m_all, l_all


@triton.jit
def _totals(m_all, l_all):
    """Rows' max over the splits (0 where no split saw a key) and their sums scaled to it: `([R], [R])`
    from the splits' maxima and sums `[SPLITS_P2, R]`."""
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_total = tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)
    return m_safe, l_total


@triton.jit
def _split_rows(PartO, PartML, base, s0, i, num_splits, r, real, PART_ROWS: tl.constexpr,
                D_BLOCK: tl.constexpr):  # fmt: skip
    """Split s0 + i's unnormalized output rows `r` and their max: `([R, D_BLOCK], [R, 1])` (0 and -inf for
    rows at or past `real` or a split past num_splits)."""
    # per row, not a scalar: the interpreter takes block masks only
    ok = (r < PART_ROWS) & (r < real) & (r * 0 + s0 + i < num_splits)
    row = r[:, None] * D_BLOCK + tl.arange(0, D_BLOCK)[None, :]
    o_ptrs = PartO + (base + s0 + i) * (PART_ROWS * D_BLOCK) + row
    o_s = tl.load(o_ptrs, mask=ok[:, None], other=0.0, cache_modifier=".cg")
    m_s = tl.load(PartML + (base + s0 + i) * 2 * PART_ROWS + r[:, None], mask=ok[:, None],
                  other=float("-inf"), cache_modifier=".cg")  # fmt: skip
    return o_s, m_s
