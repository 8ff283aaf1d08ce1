"""Issue 14 probe (scratch; run once on an H100, h100/prefill-gluon/runbook20-*: 3.5-4.5% faster than the
one-tile launch at 2k-8k, slower on padded batches; the library's persistent schedule since 4e044cd, same
SASS instruction counts): the library's Gluon prefill launch
(kernels/prefill_gluon.py, st3-pp: FA3's ping-pong) made persistent. One program per SM walks the tiles
(query block, sequence and head), the last query blocks of every head first. The producer loads the next
tile's Q as soon as both consumers have released the current one (after their last QK^T), and its K/V into
the ring as stages free up, while the consumers finish the current tile's last PV and store it. On the
H100 the plain launch reaches 0.81x cuDNN at B=8 L=2k and 0.99x at L=16k
(h100/tuning-prefill-grid-gluon-20261207.md): each program's prologue (Q, the first K/V) and epilogue (the
store) run with nothing beside them (one 224 KiB program an SM).

The ring of stages and the two "turn" barriers run on across tiles: block i of a tile is the ring's block
r0 + i (its stage, the barriers' parities, and whose turn it is).

    python fa_gluon_persistent.py compile          (no GPU: sm_90 with Triton 3.6's ptxas on PYTHONPATH)
    python fa_gluon_persistent.py check            (GPU: against SDPA in float32 and the library launch)
    python fa_gluon_persistent.py time <out.json>  (GPU: against SDPA, the stored launch and the library's
                                                     st3-pp, interleaved; padded batches too)
Results: benchmarks/results/h100/prefill-gluon/."""

import json
import math
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
    warpgroup_mma_wait,
)

from attnforge.kernels.prefill_gluon import (
    BLOCK_M,
    BLOCK_N,
    LOG2E,
    ROWS,
    _descriptor,
    _p_operand,
    _qk,
    _softmax,
)


@gluon.jit
def _tile(t, num_heads, n_bh, q_len, kv_len, KvLens, QLens, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
          HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """Tile t: its sequence b, head h, first query row m0, valid rows / keys and key blocks (the library's
    per-program scalars); the last query blocks of every head come first."""
    bh = t % n_bh
    m0 = (gl.cdiv(q_len, BLOCK_M) - 1 - t // n_bh) * BLOCK_M
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
    return b, bh % num_heads, m0, q_end, kv_end, n_blocks


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_free, k_ready, v_ready, empty, KvLens,
              QLens, num_heads, group, n_bh, n_tiles, q_len, kv_len, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """One warp: per tile, each consumer's Q once it released the last tile's, then the tile's K/V blocks
    into the ring (block r of the ring into stage r % STAGES once both consumers released it)."""
    r = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, q_end, kv_end, n_blocks = _tile(t, num_heads, n_bh, q_len, kv_len, KvLens, QLens, CAUSAL,
                                                  HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        for part in gl.static_range(2):
            mbarrier.wait(q_free.index(part), (j & 1) ^ 1)
            mbarrier.expect(q_bar.index(part), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                q_desc, [b, h, m0 + part * ROWS, 0], q_bar.index(part), q_smem.index(part)
            )
        for i in range(n_blocks):
            stage = (r + i) % STAGES
            start = gl.minimum(i * BLOCK_N, kv_end - BLOCK_N)
            mbarrier.wait(empty.index(stage), (((r + i) // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                k_desc, [b, h // group, start, 0], k_ready.index(stage), k_bufs.index(stage)
            )
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                v_desc, [b, h // group, start, 0], v_ready.index(stage), v_bufs.index(stage)
            )
        r += n_blocks
        j += 1  # noqa: SIM113 - a Gluon loop has no enumerate


@gluon.jit
def _block(i, r, acc, p_prev, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
           turn_other, TURN_FLIP: gl.constexpr, rows_last, kv_end, qk_scale, MASKED: gl.constexpr,
           STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr,
           o_layout: gl.constexpr):  # fmt: skip
    """The library's `_block_in_turn` for block i of a tile, the ring's block r (i >= 1)."""
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
def _blocks(r0, acc, m_i, l_i, q_tile, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine, turn_other,
            TURN_FLIP: gl.constexpr, rows_last, kv_end, qk_scale, n_lean, n_blocks, STAGES: gl.constexpr,
            HEAD_DIM: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):  # fmt: skip
    """The library's `_blocks_in_turn` from ring block r0; Q released after the last QK^T, before the last
    PV."""
    mbarrier.wait(turn_mine, (r0 & 1) ^ TURN_FLIP)
    s = _qk(q_tile, k_bufs, k_ready, r0, STAGES, HEAD_DIM, s_layout)
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, m_i, l_i = _softmax(0, s, m_i, l_i, rows_last, kv_end, qk_scale, True, s_layout)
    p_op = _p_operand(p, q_tile.dtype, o_layout)
    for i in range(1, n_lean):
        acc, p_op, m_i, l_i = _block(i, r0 + i, acc, p_op, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready,
                                     empty, turn_mine, turn_other, TURN_FLIP, rows_last, kv_end, qk_scale,
                                     False, STAGES, HEAD_DIM, s_layout, o_layout)  # fmt: skip
    for i in range(gl.maximum(n_lean, 1), n_blocks):
        acc, p_op, m_i, l_i = _block(i, r0 + i, acc, p_op, m_i, l_i, q_tile, k_bufs, v_bufs, k_ready, v_ready,
                                     empty, turn_mine, turn_other, TURN_FLIP, rows_last, kv_end, qk_scale,
                                     True, STAGES, HEAD_DIM, s_layout, o_layout)  # fmt: skip
    mbarrier.arrive(q_free, count=1)  # every QK^T of the tile has completed
    last = (r0 + n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((r0 + n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consumer(q_smem, q_bar, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine, turn_other, Out,
              KvLens, QLens, stride_ob, stride_oh, stride_om, stride_od, num_heads, n_bh, n_tiles, q_len,
              kv_len, qk_scale, PART: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """Consumer warpgroup PART (rows [m0 + PART * ROWS, + ROWS) of each tile): the library's `_consumer`
    per tile, the ring's block count carried on."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    q_tile = q_smem.reshape([ROWS, HEAD_DIM])
    r = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, q_end, kv_end, n_blocks = _tile(t, num_heads, n_bh, q_len, kv_len, KvLens, QLens, CAUSAL,
                                                  HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        m0 = m0 + PART * ROWS
        rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        shift = kv_end - q_end
        rows_last = rows + shift if CAUSAL else rows + kv_end
        n_lean = kv_end // BLOCK_N
        if CAUSAL:
            n_lean = gl.maximum(gl.minimum((shift + m0 + 1) // BLOCK_N, n_lean), 0)
        n_lean = gl.minimum(n_lean, n_blocks)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, j & 1)
        if n_blocks > 0:
            acc, m_i, l_i = _blocks(r, acc, m_i, l_i, q_tile, q_free, k_bufs, v_bufs, k_ready, v_ready, empty,
                                    turn_mine, turn_other, 1 - PART, rows_last, kv_end, qk_scale, n_lean,
                                    n_blocks, STAGES, HEAD_DIM, s_layout, o_layout)  # fmt: skip
        else:
            mbarrier.arrive(q_free, count=1)
        r += n_blocks
        j += 1  # noqa: SIM113 - a Gluon loop has no enumerate
        inv = 1.0 / gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), gl.SliceLayout(1, o_layout))
        o_rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        out = gl.where((o_rows < q_end)[:, None], acc * inv[:, None], 0.0)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = (Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                + o_rows.to(gl.int64)[:, None] * stride_om + cols[None, :] * stride_od)  # fmt: skip
        gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(o_rows < q_len)[:, None])


@gluon.jit
def _kernel(q_desc, k_desc, v_desc, Out, KvLens, QLens, stride_ob, stride_oh, stride_om, stride_od, num_heads,
            group, n_bh, q_len, kv_len, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
            CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    n_tiles = n_bh * gl.cdiv(q_len, BLOCK_M)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
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
    kb, vb, kr, vr = k_bufs, v_bufs, k_ready, v_ready
    sob, soh, som, sod = stride_ob, stride_oh, stride_om, stride_od
    gl.warp_specialize(
        [
            (_consumer, (q_smem.index(0), q_bar.index(0), q_free.index(0), kb, vb, kr, vr, empty,
                         turn.index(0), turn.index(1), Out, KvLens, QLens, sob, soh, som, sod, num_heads,
                         n_bh, n_tiles, q_len, kv_len, qk_scale, 0, HEAD_DIM, STAGES, CAUSAL, HAS_KV_LENS,
                         HAS_Q_LENS)),
            (_consumer, (q_smem.index(1), q_bar.index(1), q_free.index(1), kb, vb, kr, vr, empty,
                         turn.index(1), turn.index(0), Out, KvLens, QLens, sob, soh, som, sod, num_heads,
                         n_bh, n_tiles, q_len, kv_len, qk_scale, 1, HEAD_DIM, STAGES, CAUSAL, HAS_KV_LENS,
                         HAS_Q_LENS)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, q_free, kr, vr, empty, KvLens, QLens,
                         num_heads, group, n_bh, n_tiles, q_len, kv_len, STAGES, CAUSAL, HAS_KV_LENS,
                         HAS_Q_LENS)),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip
    for part in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(part))
        mbarrier.invalidate(q_free.index(part))
        mbarrier.invalidate(turn.index(part))
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(stage))
        mbarrier.invalidate(v_ready.index(stage))
        mbarrier.invalidate(empty.index(stage))


_FULL_LENS: dict = {}


def attention(q, k, v, causal=True, kv_lens=None, q_lens=None, out=None, stages=3):
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` -> `[B, Hq, Lq, D]` (what the library launch takes). Without
    kv_lens the launch reads a cached tensor of full lengths: with the key length a constant of the tile loop,
    a consumer has 155-176 local loads and stores (spills), with it loaded per tile 18
    (offline, cpu/prefill-gluon/compile-persistent-20261207.txt)."""
    batch, num_heads, q_len, head_dim = q.shape
    if kv_lens is None:
        key = (batch, k.shape[2], q.device)
        if key not in _FULL_LENS:
            _FULL_LENS[key] = torch.full((batch,), k.shape[2], dtype=torch.int32, device=q.device)
        kv_lens = _FULL_LENS[key]
    out = torch.empty_like(q) if out is None else out
    n_bh = batch * num_heads
    tiles = n_bh * triton.cdiv(q_len, BLOCK_M.value)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    _kernel[(min(tiles, sms),)](
        _descriptor(q, ROWS.value), _descriptor(k, BLOCK_N.value), _descriptor(v, BLOCK_N.value), out,
        kv_lens if kv_lens is not None else out, q_lens if q_lens is not None else out, *out.stride(),
        num_heads, num_heads // k.shape[1], n_bh, q_len, k.shape[2], head_dim**-0.5 * LOG2E,
        HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        HAS_Q_LENS=q_lens is not None,
        num_warps=4,
    )  # fmt: skip
    return out


def compile_offline(head_dim=128, stages=3, lens=False, kv_lens=True):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q = torch.zeros(2, 4, 256, head_dim, dtype=torch.bfloat16)
    descs = (_descriptor(q, ROWS.value), _descriptor(q, BLOCK_N.value), _descriptor(q, BLOCK_N.value))
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("q_desc", "k_desc", "v_desc"), descs, strict=True)}  # fmt: skip
    ints = ("stride_ob", "stride_oh", "stride_om", "stride_od", "num_heads", "group", "n_bh", "q_len",
            "kv_len")  # fmt: skip
    sig.update(Out="*bf16", KvLens="*i32", QLens="*i32", qk_scale="fp32", **dict.fromkeys(ints, "i32"))
    constants = dict(HEAD_DIM=head_dim, STAGES=stages, CAUSAL=True, HAS_KV_LENS=kv_lens or lens,
                     HAS_Q_LENS=lens)  # fmt: skip
    sig.update(dict.fromkeys(constants, "constexpr"))
    src = GluonASTSource(fn=_kernel, signature=sig, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _library(q, k, v, out, causal=True, kv_lens=None, q_lens=None):
    from attnforge.kernels import prefill

    params = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, gluon=True, pingpong=True)
    prefill._prefill_into(q, k, v, out, q.shape[3] ** -0.5, causal, kv_lens, q_lens, None, params)
    return out


def check() -> bool:
    """Against SDPA in float32 (no lengths) and the library launch (bit for bit: the same per-tile work),
    with and without lengths, and 5 repeats bit for bit."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ok = True
    for b, hq, hkv, lq, lkv, d, lens in ((2, 8, 2, 1000, 1000, 128, None), (1, 4, 4, 300, 1300, 128, None),
                                         (2, 8, 8, 777, 777, 64, None), (4, 32, 8, 2048, 2048, 128, None),
                                         (3, 8, 2, 700, 700, 128, [700, 0, 129])):  # fmt: skip
        torch.manual_seed(lq)
        q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
        out = attention(q, k, v, kv_lens=lens_t, q_lens=lens_t, out=torch.full_like(q, math.nan))
        torch.cuda.synchronize()
        same_as_library = torch.equal(out, _library(q, k, v, torch.empty_like(q), True, lens_t, lens_t))
        repeats = all(torch.equal(attention(q, k, v, kv_lens=lens_t, q_lens=lens_t), out) for _ in range(5))
        err = 0.0
        if lens is None:
            kf, vf = (t.float().repeat_interleave(hq // hkv, 1) for t in (k, v))
            mask = torch.ones(lq, lkv, dtype=torch.bool, device="cuda").tril(lkv - lq)
            ref = sdpa(q.float(), kf, vf, attn_mask=mask)
            err = ((out.float() - ref).norm() / ref.norm()).item()
        row_ok = err < 1e-2 and same_as_library and repeats and bool(torch.isfinite(out).all())
        print({"shape": [b, hq, hkv, lq, lkv, d], "lens": lens, "rel_l2": err, "ok": row_ok,
               "same_as_library": same_as_library, "same_bits_5x": repeats}, flush=True)  # fmt: skip
        ok = ok and row_ok
    return ok


def _calls(q, k, v, out, lens=None) -> dict:
    """SDPA (without lengths), the launch the tuning table stores for the call, the library's st3-pp and the
    persistent launch."""
    from attnforge.kernels.prefill import prefill_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {} if lens is not None else {"sdpa-gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)}
    return {**calls, "stored": lambda: prefill_attention(q, k, v, kv_lens=lens, q_lens=lens, out=out),
            "library-st3-pp": lambda: _library(q, k, v, out, True, lens, lens),
            "persistent-st3-pp": lambda: attention(q, k, v, kv_lens=lens, q_lens=lens, out=out)}  # fmt: skip


# (batch, length, valid lengths or None): causal 32:8 d128; the padded rows are the prefill grid's shapes
TIME_ROWS = ((8, 2048, None), (4, 4096, None), (2, 8192, None), (1, 16384, None), (32, 512, None),
             (8, 2048, (2048, 1900, 1500, 1024, 777, 512, 300, 2000)),
             (16, 1024, (1024, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 1024, 999, 513,
                         257)))  # fmt: skip


def time_rows(path: str) -> None:
    from attnforge.bench.timing import summarize, time_interleaved

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}  # fmt: skip
    for batch, length, valid in TIME_ROWS:
        q = torch.randn(batch, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = None if valid is None else torch.tensor(valid, dtype=torch.int32, device="cuda")
        calls = _calls(q, k, v, torch.empty_like(q), lens)
        flops = sum(4 * 32 * n * n / 2 * 128 for n in (valid or [length] * batch))
        label = f"B={batch} 32:8 L={length}{' padded' if valid else ''}"
        for name, samples in time_interleaved(calls, reps=20).items():
            us = summarize(samples)["median_us"]
            doc["rows"].append(dict(batch=batch, length=length, valid=valid, call=name, us=us,
                                    tflops=flops / us / 1e6))  # fmt: skip
            print(f"{label} {name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s", flush=True)
            with open(path, "w") as fh:
                json.dump(doc, fh, indent=1)


def main() -> None:
    if sys.argv[1] == "compile":
        from fa_gluon import _sass_summary

        for head_dim, lens, kv_lens in ((128, False, False), (128, False, True), (128, True, True),
                                        (64, False, True)):  # fmt: skip
            summary = _sass_summary(compile_offline(head_dim, lens=lens, kv_lens=kv_lens))
            print(f"d{head_dim} kv_lens={kv_lens} q_lens={lens}: {summary}")
    elif sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    else:
        time_rows(sys.argv[2])


if __name__ == "__main__":
    main()
