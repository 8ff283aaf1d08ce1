"""Issue 14 probe (scratch): a causal prefill kernel written in Gluon for Hopper, where Triton 3.6's automatic
warp specialization stops (one loop, every block masked, no ping-pong: 0.65-0.86x cuDNN,
docs/notes/prefill.md). Explicit partitions: one producer warp loads Q once and K/V blocks by TMA into a
ring of shared-memory stages (mbarriers: K ready, V ready, stage empty); the consumers (8 warps, two
warpgroups of 64 rows, in one partition or, "split", in two) run QK^T and PV on wgmma, the online softmax in
base 2, the blocks every row sees unmasked and only the diagonal ones masked (two loops: nothing here forbids
it). P goes to the PV wgmma from registers; "pipelined" issues S_{i+1} before the softmax of S_i. Plain
prompts (no kv_lens, no q_lens, Lkv >= Lq, bottom-right causal), bf16/fp16, d 64/128, GQA.

    python fa_gluon.py compile [<variant>...]  (no GPU: compiles for sm_90 with Triton's ptxas, d128 and d64,
                                             prints registers, spills and what the SASS holds; Triton 3.6 on
                                             PYTHONPATH)
    python fa_gluon.py check <variant>     (GPU: one of VARIANTS against SDPA in float32: odd sizes, GQA, a
                                             chunk, causal or not; exit status 1 if wrong)
    python fa_gluon.py time <out.json> <variant>...  (GPU: those variants interleaved with SDPA (enable_gqa)
                                             and prefill's stored launch, causal prompts (ROWS) bf16)
Results: benchmarks/results/h100/prefill-gluon/."""

import json
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
BLOCK_M = 128  # query rows a program: two warpgroups of 64 (in one partition of 8 warps, or split in two)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty,
                    bh, kv_bh, m0, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    CONSUMERS: gl.constexpr):  # fmt: skip
    """The producer (one warp): each consumer's rows of Q once, then each K/V block into stage i % STAGES once
    every consumer has released it (a fresh barrier passes the first wait on parity 1)."""
    rows: gl.constexpr = q_desc.block_type.shape[1]
    for part in gl.static_range(CONSUMERS):
        mbarrier.expect(q_bar.index(part), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [bh, m0 + part * rows, 0], q_bar.index(part), q_smem.index(part)
        )
    for i in range(n_blocks):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            k_desc, [kv_bh, i * BLOCK_N, 0], k_ready.index(stage), k_bufs.index(stage)
        )
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            v_desc, [kv_bh, i * BLOCK_N, 0], v_ready.index(stage), v_bufs.index(stage)
        )


@gluon.jit
def _softmax(i, s, m_i, l_i, rows_last, kv_len, qk_scale, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
             s_layout: gl.constexpr):  # fmt: skip
    """The online softmax of key block i in base 2 (MASKED: keys past a row's last visible one or past
    kv_len out): P, the rescale of what came before, the new maximum and sum."""
    if MASKED:
        keys = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (keys[None, :] <= rows_last[:, None]) & (keys < kv_len)[None, :]
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _block(i, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, rows_last, kv_len, qk_scale,
           MASKED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
           STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):  # fmt: skip
    """One key block: S = Q K^T (wgmma, Q and K in shared memory), the online softmax (MASKED: keys past a
    row's last visible one or past kv_len), O = O * alpha + P V (P from registers); the stage released."""
    stage = i % STAGES
    phase = (i // STAGES) & 1
    k_tile = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    v_tile = v_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(k_ready.index(stage), phase)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q2d, k_tile.permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, m_new, l_i = _softmax(i, s, m_i, l_i, rows_last, kv_len, qk_scale, MASKED, BLOCK_N, s_layout)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p_op = gl.convert_layout(
        p.to(v_tile.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    )
    mbarrier.wait(v_ready.index(stage), phase)
    acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(stage), count=1)
    return acc, m_new, l_i


@gluon.jit
def _qk_issue(j, q2d, k_bufs, k_ready, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
    """S_j = Q K_j^T issued on the tensor cores, not waited for."""
    stage = j % STAGES
    mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
    k_tile = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q2d, k_tile.permute((1, 0)), s, use_acc=False, is_async=True)


@gluon.jit
def _block_pipelined(i, n_blocks, s, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, rows_last,
                     kv_len, qk_scale, MASKED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                     o_layout: gl.constexpr):  # fmt: skip
    """FA3's overlap inside a warpgroup: with S_i in registers, S_{i+1} is issued first (the last block issues
    its own again, a wasted product, rather than a branch around an asynchronous result), the softmax of S_i
    runs while it computes, PV_{i-1} is waited for (its stage released) only before the rescale, and PV_i is
    left in flight for the next block's softmax."""
    s_next = _qk_issue(gl.minimum(i + 1, n_blocks - 1), q2d, k_bufs, k_ready, BLOCK_M, BLOCK_N, HEAD_DIM,
                       STAGES, s_layout)  # fmt: skip
    p, alpha, m_new, l_i = _softmax(i, s, m_i, l_i, rows_last, kv_len, qk_scale, MASKED, BLOCK_N, s_layout)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # PV_{i-1} (issued before S_{i+1}) is done
    prev = (i + STAGES - 1) % STAGES
    mbarrier.arrive(empty.index(prev), count=1, pred=i > 0)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    stage = i % STAGES
    v_tile = v_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    p_op = gl.convert_layout(
        p.to(v_tile.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    )
    mbarrier.wait(v_ready.index(stage), (i // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
    s_next = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))  # S_{i+1} done, PV_i in flight
    return s_next, acc, m_new, l_i


@gluon.jit
def _block_pingpong(i, acc, p_prev, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                    turn_other, TURN_FLIP: gl.constexpr, rows_last, kv_len, qk_scale, MASKED: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):  # fmt: skip
    """Block i with P_{i-1} V_{i-1} deferred into it (FA3's ping-pong of two consumer warpgroups): in this
    warpgroup's turn S_i = Q K_i^T and O += P_{i-1} V_{i-1} are issued together and the turn passes to the
    other warpgroup, whose products then run while this one's softmax does; S_i awaited, its softmax
    overlapping PV_{i-1}; PV_{i-1} awaited, its stage released, O rescaled. TURN_FLIP 1: this warpgroup's
    first turn needs no arrival (a fresh barrier passes a wait on parity 1)."""
    stage = i % STAGES
    prev = (i + STAGES - 1) % STAGES
    k_tile = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
    v_prev = v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(k_ready.index(stage), (i // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
    mbarrier.wait(turn_mine, (i & 1) ^ TURN_FLIP)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q2d, k_tile.permute((1, 0)), s, use_acc=False, is_async=True)
    acc = warpgroup_mma(p_prev, v_prev, acc, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    p, alpha, m_new, l_i = _softmax(i, s, m_i, l_i, rows_last, kv_len, qk_scale, MASKED, BLOCK_N, s_layout)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p_op = gl.convert_layout(
        p.to(v_prev.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    )
    return acc, p_op, m_new, l_i


@gluon.jit
def _loop_pingpong(acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine, turn_other,
                   TURN_FLIP: gl.constexpr, rows_last, kv_len, qk_scale, n_lean, n_blocks,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):  # fmt: skip
    """Every key block in turns with the other consumer warpgroup: block 0 alone (masked: right for any
    block), blocks 1.. with the previous block's PV deferred into them, the last PV after the loop."""
    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(turn_mine, TURN_FLIP)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q2d, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s, use_acc=False,
                      is_async=True)  # fmt: skip
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, m_i, l_i = _softmax(0, s, m_i, l_i, rows_last, kv_len, qk_scale, True, BLOCK_N, s_layout)
    p_op = gl.convert_layout(
        p.to(q2d.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    )
    for i in range(1, n_lean):
        acc, p_op, m_i, l_i = _block_pingpong(i, acc, p_op, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready,
                                              empty, turn_mine, turn_other, TURN_FLIP, rows_last, kv_len,
                                              qk_scale, False, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                                              o_layout)  # fmt: skip
    for i in range(gl.maximum(n_lean, 1), n_blocks):
        acc, p_op, m_i, l_i = _block_pingpong(i, acc, p_op, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready,
                                              empty, turn_mine, turn_other, TURN_FLIP, rows_last, kv_len,
                                              qk_scale, True, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                                              o_layout)  # fmt: skip
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _compute_partition(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, turn_mine, turn_other, Out,
                       stride_ob, stride_oh, stride_om, b, h, m0, q_len, kv_len, n_blocks, qk_scale,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPS: gl.constexpr,
                       PIPELINED: gl.constexpr, PINGPONG: gl.constexpr, TURN_FLIP: gl.constexpr):  # fmt: skip
    """A consumer partition (WARPS warps, rows [m0, m0 + BLOCK_M)): the lean blocks, the masked ones (all the
    producer loads: in the upper half of a split block some are masked whole, which costs work, not
    correctness), the store."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                        instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    if CAUSAL:  # key blocks every row of this partition sees; the rest of the producer's blocks are masked
        n_lean = gl.minimum((kv_len - q_len + m0 + 1) // BLOCK_N, kv_len // BLOCK_N)
    else:
        n_lean = kv_len // BLOCK_N
    # bottom-right causal: row i sees keys <= Lkv - Lq + i; not causal: every key
    rows_last = rows + (kv_len - q_len) if CAUSAL else rows + kv_len
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    q2d = q_smem.reshape([BLOCK_M, HEAD_DIM])
    if PINGPONG:
        gl.static_assert(not PIPELINED)
        acc, m_i, l_i = _loop_pingpong(acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                                       turn_other, TURN_FLIP, rows_last, kv_len, qk_scale, n_lean, n_blocks,
                                       BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout)  # fmt: skip
    elif PIPELINED:
        # S_{i+1} is awaited before stage i-1 is released: with 2 stages the producer would wait on that
        # release to load block i+1 (a deadlock)
        gl.static_assert(STAGES >= 3)
        s = _qk_issue(0, q2d, k_bufs, k_ready, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        acc = warpgroup_mma_init(acc)  # loop-carried as an asynchronous accumulator
        for i in range(n_lean):
            s, acc, m_i, l_i = _block_pipelined(i, n_blocks, s, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready,
                                                v_ready, empty, rows_last, kv_len, qk_scale, False, BLOCK_M,
                                                BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout)  # fmt: skip
        for i in range(n_lean, n_blocks):
            s, acc, m_i, l_i = _block_pipelined(i, n_blocks, s, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready,
                                                v_ready, empty, rows_last, kv_len, qk_scale, True, BLOCK_M,
                                                BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout)  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((n_blocks - 1) % STAGES), count=1)
    else:
        for i in range(n_lean):
            acc, m_i, l_i = _block(i, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, rows_last,
                                   kv_len, qk_scale, False, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                                   o_layout)  # fmt: skip
        for i in range(n_lean, n_blocks):
            acc, m_i, l_i = _block(i, acc, m_i, l_i, q2d, k_bufs, v_bufs, k_ready, v_ready, empty, rows_last,
                                   kv_len, qk_scale, True, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                                   o_layout)  # fmt: skip
    inv = 1.0 / gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), gl.SliceLayout(1, o_layout))
    out = acc * inv[:, None]
    o_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = (Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            + o_rows.to(gl.int64)[:, None] * stride_om + cols[None, :])  # fmt: skip
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(o_rows < q_len)[:, None])


@gluon.jit
def _fwd(q_desc, k_desc, v_desc, Out, stride_ob, stride_oh, stride_om, num_heads, group, q_len, kv_len,
         qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
         STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPS: gl.constexpr, PIPELINED: gl.constexpr,
         SPLIT: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """SPLIT: two consumer partitions of one warpgroup each (64 rows each), which run apart unless PINGPONG
    (FA3's schedule: each issues its products in turn, two "turn" barriers passing the turn), else one of two
    warpgroups in step."""
    gl.static_assert(SPLIT or not PINGPONG)
    CONSUMERS: gl.constexpr = 2 if SPLIT else 1
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    bh = gl.program_id(0)
    m0 = (gl.num_programs(1) - 1 - gl.program_id(1)) * BLOCK_M  # the heaviest (last) query blocks first
    b = bh // num_heads
    h = bh % num_heads
    kv_bh = b * (num_heads // group) + h // group
    hi = gl.minimum(kv_len, kv_len - q_len + gl.minimum(m0 + BLOCK_M, q_len)) if CAUSAL else kv_len
    n_blocks = gl.cdiv(hi, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for part in gl.static_range(CONSUMERS):
        mbarrier.init(q_bar.index(part), count=1)
        mbarrier.init(turn.index(part), count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=CONSUMERS)  # each consumer releases each stage
    fence_async_shared()

    kb, vb, kr, vr = k_bufs, v_bufs, k_ready, v_ready
    if SPLIT:
        gl.warp_specialize(
            [
                (_compute_partition, (q_smem.index(0), kb, vb, q_bar.index(0), kr, vr, empty, turn.index(0),
                                      turn.index(CONSUMERS - 1), Out, stride_ob, stride_oh, stride_om, b, h,
                                      m0, q_len, kv_len, n_blocks, qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES,
                                      CAUSAL, WARPS, PIPELINED, PINGPONG, 1)),
                (_compute_partition, (q_smem.index(1), kb, vb, q_bar.index(1), kr, vr, empty, turn.index(1),
                                      turn.index(0), Out, stride_ob, stride_oh, stride_om, b, h, m0 + ROWS,
                                      q_len, kv_len, n_blocks, qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES,
                                      CAUSAL, WARPS, PIPELINED, PINGPONG, 0)),
                (_load_partition, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, kr, vr, empty, bh, kv_bh,
                                   m0, n_blocks, BLOCK_N, STAGES, CONSUMERS)),
            ],
            [WARPS, 1],
            [240, 24],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_compute_partition, (q_smem.index(0), kb, vb, q_bar.index(0), kr, vr, empty, turn.index(0),
                                      turn.index(CONSUMERS - 1), Out, stride_ob, stride_oh, stride_om, b, h,
                                      m0, q_len, kv_len, n_blocks, qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES,
                                      CAUSAL, WARPS, PIPELINED, PINGPONG, 1)),
                (_load_partition, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, kr, vr, empty, bh, kv_bh,
                                   m0, n_blocks, BLOCK_N, STAGES, CONSUMERS)),
            ],
            [1],
            [24],
        )  # fmt: skip
    for part in gl.static_range(CONSUMERS):
        mbarrier.invalidate(q_bar.index(part))
        mbarrier.invalidate(turn.index(part))
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(stage))
        mbarrier.invalidate(v_ready.index(stage))
        mbarrier.invalidate(empty.index(stage))


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` as `[B * H, L, D]` (a copy where the batch stride is not H whole heads)."""
    b, h, n, d = t.shape
    if t.stride(3) != 1 or t.stride(0) != h * t.stride(1):
        t = t.contiguous()
    return t.as_strided((b * h, n, d), (t.stride(1), t.stride(2), 1))


def descriptors(q, k, v, block_m: int, block_n: int):
    """3-d TMA descriptors `[B*H, L, D]` (TMA zero-fills past each head's L)."""
    out = []
    for t, rows in ((q, block_m), (k, block_n), (v, block_n)):
        t3 = _rows3(t)
        block = [1, rows, t.shape[3]]
        layout = gl.NVMMASharedLayout.get_default_for(
            block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
        )
        out.append(TensorDescriptor(t3, list(t3.shape), list(t3.stride()), block, layout))
    return out


def attention(
    q,
    k,
    v,
    causal=True,
    scale=None,
    block_n=128,
    stages=2,
    pipelined=False,
    split=False,
    pingpong=False,
    out=None,
):
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` (Lkv >= Lq, D 64 or 128, fp16/bf16) -> `[B, Hq, Lq, D]`."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    assert kv_len >= q_len and head_dim in (64, 128) and heads % kv_heads == 0
    out = torch.empty_like(q) if out is None else out
    scale = head_dim**-0.5 if scale is None else scale
    warps = 4 if split else 8  # the default partition's: one consumer warpgroup, or both
    q_desc, k_desc, v_desc = descriptors(q, k, v, BLOCK_M // 2 if split else BLOCK_M, block_n)
    grid = (batch * heads, triton.cdiv(q_len, BLOCK_M))
    _fwd[grid](q_desc, k_desc, v_desc, out, out.stride(0), out.stride(1), out.stride(2), heads,
               heads // kv_heads, q_len, kv_len, scale * LOG2E, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
               HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal, WARPS=warps, PIPELINED=pipelined, SPLIT=split,
               PINGPONG=pingpong, num_warps=warps)  # fmt: skip
    return out


def compile_offline(
    block_n=128, stages=2, head_dim=128, causal=True, pipelined=False, split=False, pingpong=False
):
    """sm_90 compile without a GPU; returns the compiled kernel."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q = torch.zeros(4, 256, head_dim, dtype=torch.bfloat16)
    descs = descriptors(q[None], q[None], q[None], BLOCK_M // 2 if split else BLOCK_M, block_n)
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("q_desc", "k_desc", "v_desc"), descs, strict=True)}  # fmt: skip
    sig.update(Out="*bf16", stride_ob="i32", stride_oh="i32", stride_om="i32", num_heads="i32", group="i32",
               q_len="i32", kv_len="i32", qk_scale="fp32")  # fmt: skip
    warps = 4 if split else 8
    constants = dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal,
                     WARPS=warps, PIPELINED=pipelined, SPLIT=split, PINGPONG=pingpong)  # fmt: skip
    sig.update(dict.fromkeys(constants, "constexpr"))
    src = GluonASTSource(fn=_fwd, signature=sig, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _sass_summary(compiled) -> str:
    import collections
    import os
    import re
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", fh.name], capture_output=True, text=True).stdout
    usage = subprocess.run([f"{bin_dir}/cuobjdump", "--dump-resource-usage", fh.name], capture_output=True,
                           text=True).stdout  # fmt: skip
    ops = collections.Counter()
    regions = []  # [registers after a setmaxnreg, local loads + stores up to the next one]
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            op = m.group(2).split(".")[0]
            ops[op] += 1
            if op == "USETMAXREG":
                regions.append([int(re.search(r"0x([0-9a-f]+)\s*;", line).group(1), 16), 0])
            elif op in ("LDL", "STL") and regions:
                regions[-1][1] += 1
    keep = (
        "HGMMA",
        "WARPGROUP",
        "SYNCS",
        "UTMALDG",
        "USETMAXREG",
        "SETMAXNREG",
        "FSEL",
        "MUFU",
        "BAR",
        "STG",
        "STS",
        "LDS",
        "SHFL",
        "LDL",
        "STL",
    )
    counts = ", ".join(f"{k} {ops[k]}" for k in keep if ops[k])
    regs = re.findall(r"REG:(\d+)", usage)
    spills = ", ".join(f"{n} at {r}" for r, n in regions if n)
    return (f"registers {regs}, SASS instructions {sum(ops.values())}: {counts}"
            + (f"; local loads + stores by setmaxnreg region: {spills}" if spills else ""))  # fmt: skip


VARIANTS = {
    "n128-st2": dict(block_n=128, stages=2),
    "n64-st3": dict(block_n=64, stages=3),
    "n128-st3-pipe": dict(block_n=128, stages=3, pipelined=True),
    "n64-st4-pipe": dict(block_n=64, stages=4, pipelined=True),
    "n128-st2-split": dict(block_n=128, stages=2, split=True),
    "n128-st3-pipe-split": dict(block_n=128, stages=3, pipelined=True, split=True),
    "n128-st3-split": dict(block_n=128, stages=3, split=True),
    "n128-st2-pp": dict(block_n=128, stages=2, split=True, pingpong=True),
    "n128-st3-pp": dict(block_n=128, stages=3, split=True, pingpong=True),
}


def check(name: str) -> list[dict]:
    """One variant against SDPA in float32 (K/V repeated per group, a bottom-right causal mask)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    shapes = [
        (2, 8, 2, 1000, 1000, 128, True),
        (1, 4, 4, 300, 1300, 128, True),
        (2, 8, 8, 777, 777, 64, True),
        (1, 32, 8, 2048, 2048, 128, False),
        (1, 32, 8, 2048, 2048, 128, True),
        (2, 4, 1, 129, 129, 128, True),
        (1, 2, 2, 5, 5, 64, True),
    ]
    for b, hq, hkv, lq, lkv, d, causal in shapes:
        torch.manual_seed(b * 1000 + lq)
        q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = torch.full_like(q, float("nan"))
        attention(q, k, v, causal=causal, out=out, **VARIANTS[name])
        torch.cuda.synchronize()
        kf, vf = (t.float().repeat_interleave(hq // hkv, 1) for t in (k, v))
        mask = torch.ones(lq, lkv, dtype=torch.bool, device="cuda").tril(lkv - lq) if causal else None
        ref = sdpa(q.float(), kf, vf, attn_mask=mask)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        # a stage overwritten while still read, or a race between the partitions, shows as changed bits
        same = all(torch.equal(attention(q, k, v, causal=causal, **VARIANTS[name]), out) for _ in range(5))
        ok = err < 1e-2 and same and bool(torch.isfinite(out).all())
        rows.append({"variant": name, "shape": [b, hq, hkv, lq, lkv, d], "causal": causal, "rel_l2": err,
                     "same_bits_5x": same, "ok": ok})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _row_calls(q, k, v, out, names: list[str]) -> dict:
    from attnforge.kernels.prefill import prefill_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"sdpa-gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
             "stored": lambda: prefill_attention(q, k, v, causal=True, out=out)}  # fmt: skip
    for name in names:
        calls[f"gluon-{name}"] = lambda name=name: attention(q, k, v, out=out, **VARIANTS[name])
    return calls


# (batch, query heads, key/value heads, length, head dim): causal prompts
ROWS = ((2, 32, 8, 8192, 128), (8, 32, 8, 2048, 128), (4, 16, 8, 4096, 128), (1, 32, 8, 16384, 128),
        (4, 32, 32, 4096, 64), (16, 32, 32, 1024, 64))  # fmt: skip


def time_rows(path: str, names: list[str]) -> None:
    """The variants that passed `check`, SDPA with enable_gqa and prefill's stored launch, interleaved."""
    from attnforge.bench.timing import summarize, time_interleaved

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}  # fmt: skip
    for batch, heads, kv_heads, length, head_dim in ROWS:
        q = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))  # fmt: skip
        calls = _row_calls(q, k, v, torch.empty_like(q), names)
        flops = 4 * batch * heads * length * length / 2 * head_dim
        for name, samples in time_interleaved(calls, reps=20).items():
            us = summarize(samples)["median_us"]
            row = dict(batch=batch, heads=heads, kv_heads=kv_heads, length=length, head_dim=head_dim)
            doc["rows"].append({**row, "call": name, "us": us, "tflops": flops / us / 1e6})
            print(f"B={batch} {heads}:{kv_heads} d{head_dim} L={length} {name}: {us:.1f} us, "
                  f"{flops / us / 1e6:.0f} TFLOP/s", flush=True)  # fmt: skip
            with open(path, "w") as fh:
                json.dump(doc, fh, indent=1)


def main() -> None:
    mode = sys.argv[1]
    if mode == "compile":
        for name in sys.argv[2:] or VARIANTS:
            for head_dim in (128, 64):
                summary = _sass_summary(compile_offline(head_dim=head_dim, **VARIANTS[name]))
                print(f"{name} d{head_dim}: {summary}")
    elif mode == "check":
        sys.exit(0 if all(r["ok"] for r in check(sys.argv[2])) else 1)
    else:
        time_rows(sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
