"""Prefill attention on Hopper written in Gluon (Triton's explicit-layout dialect): FlashAttention-3's design
where Triton 3.6's automatic warp specialization stops (one loop, every block masked, no overlap).

A program owns 128 query rows of one (sequence, query head). One producer warp loads each consumer's 64 rows
of Q once and every visible K/V block by TMA into a ring of shared-memory stages (mbarriers: K ready, V ready,
stage empty, released by both consumers). Two consumer warpgroups, in partitions of their own, each run
QK^T and PV on wgmma (P from registers) with an online softmax in base 2: the key blocks every row of the
warpgroup sees unmasked, the diagonal and valid-length ones masked. PINGPONG adds FA3's schedule: the two
warpgroups issue their products in turn (two "turn" barriers), each block's PV deferred into the next
block's turn, so one warpgroup's softmax runs while the other's products do. PERSISTENT (with ping-pong):
one program per SM walks the tiles, the last query blocks of every head first; the ring of stages and the
turns run on across tiles, and each consumer releases its Q after a tile's last QK^T, so the next tile's Q
and first K/V load under the last PV and the store.

Valid lengths: K and V are never read at or past kv_lens[b]. The last block of a sequence whose valid keys
end inside it is loaded shifted to end at its last valid key (TMA zero-fills coordinates below 0), and the
keys that the previous block already covered are masked. Descriptors are 4-d `[B, H, L, D]` with the
tensors' own strides, so a Q in transformers' layout or K/V slicing a longer cache are read in place.
Used through `prefill.py` when the tuning table's entry asks for it ("gluon") and `supported` allows.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon  # Gluon's Hopper API (triton >= 3.5; prefill.py guards the import)
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnforge.environment import triton_interpret
from attnforge.kernels.tuning import sm_count

LOG2E = 1.4426950408889634
# (constexpr: the kernels read them)
BLOCK_M = gl.constexpr(128)  # query rows a program: two consumer warpgroups of 64
ROWS = gl.constexpr(64)  # query rows a consumer warpgroup
BLOCK_N = gl.constexpr(128)  # keys a stage
HEAD_DIMS = (64, 128)
# Gluon is experimental and its API moves between Triton releases: the launch was written and measured on 3.6
MIN_TRITON = (3, 6)
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# (stages, pingpong, persistent) the launch takes: shared memory holds Q (32 KiB at d128) and 2-3 K/V stages
# (64 KiB each); the persistent schedule runs ping-pong only
SCHEDULES = ((2, False, False), (3, False, False), (2, True, False), (3, True, False), (3, True, True))


@gluon.jit
def _tile(bh, m0, num_heads, q_len, kv_len, KvLens, QLens, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
          HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """The tile of query rows [m0, m0 + BLOCK_M) of (sequence, query head) bh: its sequence b and head h,
    its sequence's valid rows q_end and keys kv_end (clamped in their own dtype, an int64 past 2^31 must not
    wrap, to [0, Lq] and [0, Lkv]) and the key blocks it sees (none past q_lens)."""
    b = bh // num_heads
    kv_end = kv_len
    if HAS_KV_LENS:
        kv_end = gl.minimum(gl.maximum(gl.load(KvLens + b), 0), kv_len).to(gl.int32)
    q_end = q_len
    if HAS_Q_LENS:
        q_end = gl.minimum(gl.maximum(gl.load(QLens + b), 0), q_len).to(gl.int32)
    hi = kv_end
    if CAUSAL:
        hi = gl.minimum(kv_end, kv_end - q_end + gl.minimum(m0 + BLOCK_M, q_end))
    n_blocks = gl.cdiv(gl.maximum(hi, 0), BLOCK_N) * (m0 < q_end).to(gl.int32)
    return b, bh % num_heads, q_end, kv_end, n_blocks


@gluon.jit
def _load_q(q_desc, q_smem, q_bar, q_free, phase, b, h, m0, WAIT: gl.constexpr):
    """Each consumer's ROWS rows of Q of the tile at m0 (WAIT: once that consumer freed its last tile's)."""
    for part in gl.static_range(2):
        if WAIT:
            mbarrier.wait(q_free.index(part), phase ^ 1)
        mbarrier.expect(q_bar.index(part), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [b, h, m0 + part * ROWS, 0], q_bar.index(part), q_smem.index(part)
        )


@gluon.jit
def _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, empty, b, kv_h, kv_end, n_blocks, r0,
             STAGES: gl.constexpr):  # fmt: skip
    """A tile's K/V blocks, the ring's blocks r0..: block r into stage r % STAGES once both consumers
    released it (a fresh barrier passes the first wait on parity 1). A block past the valid keys (kv_end)
    is loaded shifted to end at them."""
    for i in range(n_blocks):
        r = r0 + i
        stage = r % STAGES
        start = gl.minimum(i * BLOCK_N, kv_end - BLOCK_N)  # shifted only where it would pass kv_end
        mbarrier.wait(empty.index(stage), ((r // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            k_desc, [b, kv_h, start, 0], k_ready.index(stage), k_bufs.index(stage)
        )
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            v_desc, [b, kv_h, start, 0], v_ready.index(stage), v_bufs.index(stage)
        )


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty,
                    b, h, kv_h, m0, kv_end, n_blocks, STAGES: gl.constexpr):  # fmt: skip
    """The producer (one warp) of one tile: each consumer's rows of Q, then each K/V block."""
    _load_q(q_desc, q_smem, q_bar, q_bar, 0, b, h, m0, False)
    _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, empty, b, kv_h, kv_end, n_blocks, 0, STAGES)


@gluon.jit
def _softmax(i, s, m_i, l_i, rows_last, kv_end, qk_scale, MASKED: gl.constexpr, s_layout: gl.constexpr):
    """The online softmax of key block i in base 2. MASKED: keys past a row's last visible one, at or past
    kv_end, or (a shifted last block) before i * BLOCK_N masked out; a row that sees nothing yet keeps 0."""
    if MASKED:
        lane = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keys = gl.minimum(i * BLOCK_N, kv_end - BLOCK_N) + lane  # where the producer loaded the block
        visible = (keys[None, :] <= rows_last[:, None]) & ((keys < kv_end) & (keys >= i * BLOCK_N))[None, :]
        s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_safe = m_new
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _qk(q_tile, k_bufs, k_ready, i, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr):
    """S_i = Q K_i^T issued on the tensor cores once K_i is in (not waited for)."""
    stage = i % STAGES
    mbarrier.wait(k_ready.index(stage), (i // STAGES) & 1)
    k_tile = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q_tile, k_tile, s, use_acc=False, is_async=True)


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, o_layout: gl.constexpr):
    """P in registers as the A operand of the PV wgmma."""
    return gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))


@gluon.jit
def _block(i, acc, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty, rows_last, kv_end, qk_scale,
           MASKED: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr,
           o_layout: gl.constexpr):  # fmt: skip
    """Key block i in step: S, its softmax, O = O * alpha + P V; the stage released."""
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q_tile, k_bufs, k_ready, i, STAGES, HEAD_DIM,
                                                           s_layout),))  # fmt: skip
    p, alpha, m_i, l_i = _softmax(i, s, m_i, l_i, rows_last, kv_end, qk_scale, MASKED, s_layout)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    stage = i % STAGES
    mbarrier.wait(v_ready.index(stage), (i // STAGES) & 1)
    v_tile = v_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(_p_operand(p, v_tile.dtype, o_layout), v_tile, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(stage), count=1)
    return acc, m_i, l_i


@gluon.jit
def _block_in_turn(i, r, acc, p_prev, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                   turn_other, TURN_FLIP: gl.constexpr, rows_last, kv_end, qk_scale, MASKED: gl.constexpr,
                   STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr,
                   o_layout: gl.constexpr):  # fmt: skip
    """Key block i >= 1 of the tile (the ring's block r: its stage, parities and turn) with PV_{i-1}
    deferred into it: in this warpgroup's turn S_i and O += P_{i-1} V_{i-1} are issued and the turn passes
    on; the softmax of S_i overlaps PV_{i-1}, then the stage of block i-1 is released and O rescaled.
    TURN_FLIP 1: the first turn needs no arrival."""
    prev = (r - 1) % STAGES
    mbarrier.wait(v_ready.index(prev), ((r - 1) // STAGES) & 1)
    mbarrier.wait(turn_mine, (r & 1) ^ TURN_FLIP)
    s = _qk(q_tile, k_bufs, k_ready, r, STAGES, HEAD_DIM, s_layout)
    v_prev = v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(p_prev, v_prev, acc, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    p, alpha, m_i, l_i = _softmax(i, s, m_i, l_i, rows_last, kv_end, qk_scale, MASKED, s_layout)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return acc, _p_operand(p, v_prev.dtype, o_layout), m_i, l_i


@gluon.jit
def _blocks_in_turn(r0, acc, m_i, l_i, q_tile, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                    turn_other, TURN_FLIP: gl.constexpr, RELEASE_Q: gl.constexpr, rows_last, kv_end, qk_scale,
                    n_lean, n_blocks, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr,
                    o_layout: gl.constexpr):  # fmt: skip
    """Every key block of a tile (n_blocks >= 1, the ring's blocks r0..) in turns with the other warpgroup:
    block 0 alone (masked, right for any block), blocks 1.. with the previous PV deferred into them, the
    last PV after the loop. RELEASE_Q: q_free arrived once the tile's last QK^T is done, before its last
    PV (the persistent schedule loads the next tile's Q meanwhile)."""
    mbarrier.wait(turn_mine, (r0 & 1) ^ TURN_FLIP)
    s = _qk(q_tile, k_bufs, k_ready, r0, STAGES, HEAD_DIM, s_layout)
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, m_i, l_i = _softmax(0, s, m_i, l_i, rows_last, kv_end, qk_scale, True, s_layout)
    p_op = _p_operand(p, q_tile.dtype, o_layout)
    for i in range(1, n_lean):
        acc, p_op, m_i, l_i = _block_in_turn(
            i, r0 + i, acc, p_op, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
            turn_other, TURN_FLIP, rows_last, kv_end, qk_scale, False, STAGES, HEAD_DIM, s_layout, o_layout,
        )  # fmt: skip
    for i in range(gl.maximum(n_lean, 1), n_blocks):
        acc, p_op, m_i, l_i = _block_in_turn(
            i, r0 + i, acc, p_op, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
            turn_other, TURN_FLIP, rows_last, kv_end, qk_scale, True, STAGES, HEAD_DIM, s_layout, o_layout,
        )  # fmt: skip
    if RELEASE_Q:
        mbarrier.arrive(q_free, count=1)
    last = r0 + n_blocks - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(last % STAGES), count=1)
    return acc, m_i, l_i


@gluon.jit
def _visible(m0, q_end, kv_end, n_blocks, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """Rows [m0, m0 + ROWS) of a tile: each row's last visible key (bottom-right causal: row r sees keys <=
    kv_end - q_end + r) and the blocks every row sees whole (lean: no mask)."""
    rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    shift = kv_end - q_end
    rows_last = rows + shift if CAUSAL else rows + kv_end
    n_lean = kv_end // BLOCK_N
    if CAUSAL:
        n_lean = gl.maximum(gl.minimum((shift + m0 + 1) // BLOCK_N, n_lean), 0)
    n_lean = gl.minimum(n_lean, n_blocks)  # a tile past q_lens loads none (waiting on one would hang)
    return rows_last, n_lean


@gluon.jit
def _store(acc, l_i, o_head, stride_om, stride_od, m0, q_end, q_len, HEAD_DIM: gl.constexpr,
           o_layout: gl.constexpr):  # fmt: skip
    """O = acc / l into rows [m0, m0 + ROWS) of o_head (this sequence and head's row 0 of the output): rows
    at or past q_end (q_lens) as 0, rows past q_len not at all."""
    inv = 1.0 / gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), gl.SliceLayout(1, o_layout))
    o_rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    out = gl.where((o_rows < q_end)[:, None], acc * inv[:, None], 0.0)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = o_head + o_rows.to(gl.int64)[:, None] * stride_om + cols[None, :] * stride_od
    gl.store(ptrs, out.to(o_head.dtype.element_ty), mask=(o_rows < q_len)[:, None])


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, turn_mine, turn_other, o_head,
              stride_om, stride_od, m0, q_end, q_len, kv_end, n_blocks, qk_scale,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
              TURN_FLIP: gl.constexpr):  # fmt: skip
    """A consumer warpgroup of one tile: rows [m0, m0 + ROWS) against every block the producer loads (lean
    ones first), then the store."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    rows_last, n_lean = _visible(m0, q_end, kv_end, n_blocks, CAUSAL, s_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    q_tile = q_smem.reshape([ROWS, HEAD_DIM])
    if PINGPONG:
        if n_blocks > 0:
            acc, m_i, l_i = _blocks_in_turn(
                0, acc, m_i, l_i, q_tile, q_bar, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                turn_other, TURN_FLIP, False, rows_last, kv_end, qk_scale, n_lean, n_blocks, STAGES, HEAD_DIM,
                s_layout, o_layout,
            )  # fmt: skip
    else:
        for i in range(n_lean):
            acc, m_i, l_i = _block(i, acc, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty,
                                   rows_last, kv_end, qk_scale, False, STAGES, HEAD_DIM, s_layout,
                                   o_layout)  # fmt: skip
        for i in range(n_lean, n_blocks):
            acc, m_i, l_i = _block(i, acc, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty,
                                   rows_last, kv_end, qk_scale, True, STAGES, HEAD_DIM, s_layout,
                                   o_layout)  # fmt: skip
    _store(acc, l_i, o_head, stride_om, stride_od, m0, q_end, q_len, HEAD_DIM, o_layout)


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """The launch's mbarriers, initialized: per consumer its Q loaded, its Q free (persistent schedule) and
    its turn (ping-pong); per stage K ready, V ready and empty (released by both consumers)."""
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for part in gl.static_range(2):
        mbarrier.init(q_bar.index(part), count=1)
        mbarrier.init(q_free.index(part), count=1)
        mbarrier.init(turn.index(part), count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=2)
    fence_async_shared()
    return q_bar, q_free, turn, k_ready, v_ready, empty


@gluon.jit
def _invalidate(q_bar, q_free, turn, k_ready, v_ready, empty, STAGES: gl.constexpr):
    for part in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(part))
        mbarrier.invalidate(q_free.index(part))
        mbarrier.invalidate(turn.index(part))
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(stage))
        mbarrier.invalidate(v_ready.index(stage))
        mbarrier.invalidate(empty.index(stage))


@gluon.jit
def _prefill_gluon_kernel(q_desc, k_desc, v_desc, Out, KvLens, QLens, stride_ob, stride_oh, stride_om,
                          stride_od, num_heads, group, q_len, kv_len, qk_scale, HEAD_DIM: gl.constexpr,
                          STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
                          HAS_Q_LENS: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """One tile a program: (sequence, query head) on axis 0 (the heads of one KV head are neighbours),
    the heaviest (last) query blocks first on axis 1."""
    m0 = (gl.num_programs(1) - 1 - gl.program_id(1)) * BLOCK_M
    b, h, q_end, kv_end, n_blocks = _tile(gl.program_id(0), m0, num_heads, q_len, kv_len, KvLens, QLens,
                                          CAUSAL, HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar, q_free, turn, kr, vr, empty = _barriers(STAGES)
    kb, vb = k_bufs, v_bufs
    o_head = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    gl.warp_specialize(
        [
            (_consumer, (q_smem.index(0), kb, vb, q_bar.index(0), kr, vr, empty, turn.index(0),
                         turn.index(1), o_head, stride_om, stride_od, m0, q_end, q_len, kv_end, n_blocks,
                         qk_scale, HEAD_DIM, STAGES, CAUSAL, PINGPONG, 1)),
            (_consumer, (q_smem.index(1), kb, vb, q_bar.index(1), kr, vr, empty, turn.index(1),
                         turn.index(0), o_head, stride_om, stride_od, m0 + ROWS, q_end, q_len,
                         kv_end, n_blocks, qk_scale, HEAD_DIM, STAGES, CAUSAL, PINGPONG, 0)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, kr, vr, empty, b, h,
                               h // group, m0, kv_end, n_blocks, STAGES)),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip
    _invalidate(q_bar, q_free, turn, kr, vr, empty, STAGES)


@gluon.jit
def _walk_tile(t, n_bh, num_heads, q_len, kv_len, KvLens, QLens, CAUSAL: gl.constexpr,
               HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """Tile t of the persistent walk, the last query blocks of every (sequence, head) first as the one-tile
    launch's grid runs them: `_tile`'s values with its first query row m0."""
    m0 = (gl.cdiv(q_len, BLOCK_M) - 1 - t // n_bh) * BLOCK_M
    b, h, q_end, kv_end, n_blocks = _tile(t % n_bh, m0, num_heads, q_len, kv_len, KvLens, QLens, CAUSAL,
                                          HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
    return b, h, m0, q_end, kv_end, n_blocks


@gluon.jit
def _persistent_load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_free, k_ready,
                               v_ready, empty, KvLens, QLens, num_heads, group, n_bh, n_tiles, q_len, kv_len,
                               STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
                               HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """The producer of the persistent schedule: per tile, each consumer's Q once it freed its last tile's,
    then the tile's K/V blocks into the ring, whose block count runs on across tiles."""
    r = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, q_end, kv_end, n_blocks = _walk_tile(t, n_bh, num_heads, q_len, kv_len, KvLens, QLens,
                                                       CAUSAL, HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        _load_q(q_desc, q_smem, q_bar, q_free, j & 1, b, h, m0, True)
        _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, empty, b, h // group, kv_end, n_blocks, r,
                 STAGES)  # fmt: skip
        r += n_blocks
        j += 1  # noqa: SIM113 - a Gluon loop has no enumerate


@gluon.jit
def _persistent_consumer(q_smem, q_bar, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                         turn_other, Out, KvLens, QLens, stride_ob, stride_oh, stride_om, stride_od,
                         num_heads, n_bh, n_tiles, q_len, kv_len, qk_scale, PART: gl.constexpr,
                         HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                         HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """Consumer warpgroup PART of the persistent schedule: rows [m0 + PART * ROWS, + ROWS) of each tile in
    ping-pong, its Q freed after the tile's last QK^T, then the store."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    q_tile = q_smem.reshape([ROWS, HEAD_DIM])
    r = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, q_end, kv_end, n_blocks = _walk_tile(t, n_bh, num_heads, q_len, kv_len, KvLens, QLens,
                                                       CAUSAL, HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        m0 = m0 + PART * ROWS
        rows_last, n_lean = _visible(m0, q_end, kv_end, n_blocks, CAUSAL, s_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, j & 1)
        if n_blocks > 0:
            acc, m_i, l_i = _blocks_in_turn(
                r, acc, m_i, l_i, q_tile, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                turn_other, 1 - PART, True, rows_last, kv_end, qk_scale, n_lean, n_blocks, STAGES, HEAD_DIM,
                s_layout, o_layout,
            )  # fmt: skip
        else:
            mbarrier.arrive(q_free, count=1)
        r += n_blocks
        j += 1  # noqa: SIM113 - a Gluon loop has no enumerate
        o_head = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        _store(acc, l_i, o_head, stride_om, stride_od, m0, q_end, q_len, HEAD_DIM, o_layout)


@gluon.jit
def _persistent_kernel(q_desc, k_desc, v_desc, Out, KvLens, QLens, stride_ob, stride_oh, stride_om, stride_od,
                       num_heads, group, n_bh, q_len, kv_len, qk_scale, HEAD_DIM: gl.constexpr,
                       STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
                       HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """One program an SM walking the tiles (ping-pong consumers)."""
    n_tiles = n_bh * gl.cdiv(q_len, BLOCK_M)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar, q_free, turn, kr, vr, empty = _barriers(STAGES)
    kb, vb = k_bufs, v_bufs
    sob, soh, som, sod = stride_ob, stride_oh, stride_om, stride_od
    gl.warp_specialize(
        [
            (_persistent_consumer, (q_smem.index(0), q_bar.index(0), q_free.index(0), kb, vb, kr, vr, empty,
                                    turn.index(0), turn.index(1), Out, KvLens, QLens, sob, soh, som, sod,
                                    num_heads, n_bh, n_tiles, q_len, kv_len, qk_scale, 0, HEAD_DIM, STAGES,
                                    CAUSAL, HAS_KV_LENS, HAS_Q_LENS)),
            (_persistent_consumer, (q_smem.index(1), q_bar.index(1), q_free.index(1), kb, vb, kr, vr, empty,
                                    turn.index(1), turn.index(0), Out, KvLens, QLens, sob, soh, som, sod,
                                    num_heads, n_bh, n_tiles, q_len, kv_len, qk_scale, 1, HEAD_DIM, STAGES,
                                    CAUSAL, HAS_KV_LENS, HAS_Q_LENS)),
            (_persistent_load_partition, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, q_free, kr, vr,
                                          empty, KvLens, QLens, num_heads, group, n_bh, n_tiles, q_len,
                                          kv_len, STAGES, CAUSAL, HAS_KV_LENS, HAS_Q_LENS)),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip
    _invalidate(q_bar, q_free, turn, kr, vr, empty, STAGES)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, params: dict) -> bool:
    """The Gluon launch takes this call with these launch parameters (`params["gluon"]` asked for): Triton
    MIN_TRITON or later, an sm_90 GPU (not the interpreter) and a call it serves (`takes`)."""
    if triton_interpret() or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if TRITON_VERSION < MIN_TRITON:
        return False
    return takes(q, k, v, attn_mask, params)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, params: dict) -> bool:
    """What the launch serves, whatever the device: a schedule in SCHEDULES, fp16/bf16, head_dim 64 or 128, no
    attn_mask, and Q, K, V each readable through a 4-d TMA descriptor (last dim contiguous, the other strides
    and the base 16-byte aligned, every stride and size below 2^31)."""
    if attn_mask is not None or schedule(params) not in SCHEDULES:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in HEAD_DIMS:
        return False
    return all(_descriptor_ok(t) for t in (q, k, v))


def schedule(params: dict) -> tuple:
    """The (stages, pingpong, persistent) schedule that launch parameters ask for."""
    return params.get("num_stages"), bool(params.get("pingpong")), bool(params.get("persistent"))


def _descriptor_ok(t: torch.Tensor) -> bool:
    """`t` `[B, H, L, D]` can back a TMA descriptor: unit last stride, 16-byte aligned base and strides."""
    size = t.element_size()
    if t.stride(3) != 1 or t.data_ptr() % 16 or max(t.shape) >= 2**31:
        return False
    return all(0 < s < 2**31 and s * size % 16 == 0 for s in t.stride()[:3])


def _descriptor(t: torch.Tensor, rows: int):
    """A 4-d TMA descriptor of `t` `[B, H, L, D]` loading `[1, 1, rows, D]` boxes (zero-filled past L)."""
    block = [1, 1, rows, t.shape[3]]
    layout = gl.NVMMASharedLayout.get_default_for(
        block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    )
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def prefill_into(q, k, v, out, scale: float, causal: bool, kv_lens, q_lens, params: dict) -> None:
    """Run the Gluon launch (`supported` checked by the caller). q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`
    (any TMA-readable strides), kv_lens/q_lens int32/int64 `[B]` or None, out `[B, Hq, Lq, D]` written."""
    batch, num_heads, q_len, head_dim = q.shape
    kv_lens = kv_lens.contiguous() if kv_lens is not None else None
    q_lens = q_lens.contiguous() if q_lens is not None else None
    persistent = bool(params.get("persistent"))
    if persistent and kv_lens is None:
        # the key length read per tile: as a constant of the tile loop each consumer spilled 155-176 times
        # (offline, benchmarks/results/cpu/prefill-gluon/compile-persistent-20261207.txt), read so 18
        kv_lens = torch.full((batch,), k.shape[2], dtype=torch.int32, device=q.device)
    descriptors = (_descriptor(q, ROWS.value), _descriptor(k, BLOCK_N.value), _descriptor(v, BLOCK_N.value))
    lens = (kv_lens if kv_lens is not None else out, q_lens if q_lens is not None else out)
    flags = dict(HEAD_DIM=head_dim, STAGES=params["num_stages"], CAUSAL=causal,
                 HAS_KV_LENS=kv_lens is not None, HAS_Q_LENS=q_lens is not None, num_warps=4)  # fmt: skip
    group, n_bh, q_blocks = num_heads // k.shape[1], batch * num_heads, triton.cdiv(q_len, BLOCK_M.value)
    if persistent:
        grid = (min(n_bh * q_blocks, sm_count(q.device)),)
        _persistent_kernel[grid](*descriptors, out, *lens, *out.stride(), num_heads, group, n_bh, q_len,
                                 k.shape[2], scale * LOG2E, **flags)  # fmt: skip
    else:
        _prefill_gluon_kernel[(n_bh, q_blocks)](
            *descriptors, out, *lens, *out.stride(), num_heads, group, q_len, k.shape[2], scale * LOG2E,
            PINGPONG=bool(params.get("pingpong")), **flags,
        )  # fmt: skip
