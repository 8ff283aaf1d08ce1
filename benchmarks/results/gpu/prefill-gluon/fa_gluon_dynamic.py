"""Issue 14 probe (scratch, never run on a GPU yet): the persistent Gluon prefill schedule with tiles taken
from a counter instead of dealt round-robin. The library's persistent schedule (kernels/prefill_gluon.py,
`_persistent_kernel`) deals tile t to program t % SMs; on padded batches the programs that draw long
sequences finish last, and it ran 4-8% slower there than the one-tile launch (h100/prefill-gluon/runbook20-*,
`persistent-time.txt`). Here each program's producer takes its next tile with one atomic add on a counter
(zeroed per launch; the heaviest tiles come first, as in the library's walk) and hands it to the two
consumers through a ring of two shared-memory slots (mbarrier "tile ready": release on arrive, acquire on
wait). A slot is written again two tiles later, once both consumers have freed that tile's Q (q_free), so
after they read it. A tile number at or past the count ends every partition's loop.

    python fa_gluon_dynamic.py compile            (no GPU: sm_90 with Triton 3.6's ptxas on PYTHONPATH)
    python fa_gluon_dynamic.py check              (GPU: bit for bit against the library's persistent schedule)
    python fa_gluon_dynamic.py time <out.json>    (GPU: fa_gluon_persistent.py's rows, this launch added)
Results: benchmarks/results/h100/prefill-gluon/."""

import sys

import fa_gluon_persistent as persistent
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from attnforge.kernels import prefill_gluon as pg
from attnforge.kernels.tuning import sm_count

SLOT_LAYOUT = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # one warp's view of a slot


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_free, k_ready, v_ready, empty, slots,
              slot_bar, Next, KvLens, QLens, num_heads, group, n_bh, n_tiles, q_len, kv_len,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
              HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """Per tile: its number into slot j % 2 for the consumers, then the library producer's loads; at the
    end, the count (no more tiles)."""
    r = 0
    j = 0
    t = gl.program_id(0)  # the first tile, then one from the counter each
    while t < n_tiles:
        slots.index(j % 2).store(gl.full([1], t, gl.int32, SLOT_LAYOUT))
        mbarrier.arrive(slot_bar.index(j % 2), count=1)
        b, h, m0, q_end, kv_end, n_blocks = pg._walk_tile(t, n_bh, num_heads, q_len, kv_len, KvLens, QLens,
                                                          CAUSAL, HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        pg._load_q(q_desc, q_smem, q_bar, q_free, j & 1, b, h, m0, True)
        pg._load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, empty, b, h // group, kv_end, n_blocks,
                    r, STAGES)  # fmt: skip
        r += n_blocks
        j += 1
        t = gl.atomic_add(Next, 1) + gl.num_programs(0)
    slots.index(j % 2).store(gl.full([1], n_tiles, gl.int32, SLOT_LAYOUT))
    mbarrier.arrive(slot_bar.index(j % 2), count=1)


@gluon.jit
def _read_slot(slots, slot_bar, j):
    mbarrier.wait(slot_bar.index(j % 2), (j // 2) & 1)
    return gl.max(slots.index(j % 2).load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)


@gluon.jit
def _consumer(q_smem, q_bar, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine, turn_other, slots,
              slot_bar, Out, KvLens, QLens, stride_ob, stride_oh, stride_om, stride_od, num_heads, n_bh,
              n_tiles, q_len, kv_len, qk_scale, PART: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr,
              HAS_Q_LENS: gl.constexpr):  # fmt: skip
    """The library's persistent consumer, its tiles read from the slots."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, pg.BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    q_tile = q_smem.reshape([pg.ROWS, HEAD_DIM])
    r = 0
    j = 0
    t = _read_slot(slots, slot_bar, 0)
    while t < n_tiles:
        b, h, m0, q_end, kv_end, n_blocks = pg._walk_tile(t, n_bh, num_heads, q_len, kv_len, KvLens, QLens,
                                                          CAUSAL, HAS_KV_LENS, HAS_Q_LENS)  # fmt: skip
        m0 = m0 + PART * pg.ROWS
        rows_last, n_lean = pg._visible(m0, q_end, kv_end, n_blocks, CAUSAL, s_layout)
        m_i = gl.full([pg.ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([pg.ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([pg.ROWS, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, j & 1)
        if n_blocks > 0:
            acc, m_i, l_i = pg._blocks_in_turn(
                r, acc, m_i, l_i, q_tile, q_free, k_bufs, v_bufs, k_ready, v_ready, empty, turn_mine,
                turn_other, 1 - PART, True, rows_last, kv_end, qk_scale, n_lean, n_blocks, STAGES, HEAD_DIM,
                s_layout, o_layout,
            )  # fmt: skip
        else:
            mbarrier.arrive(q_free, count=1)
        r += n_blocks
        j += 1
        o_head = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        pg._store(acc, l_i, o_head, stride_om, stride_od, m0, q_end, q_len, HEAD_DIM, o_layout)
        t = _read_slot(slots, slot_bar, j)


@gluon.jit
def _kernel(q_desc, k_desc, v_desc, Out, KvLens, QLens, Next, stride_ob, stride_oh, stride_om, stride_od,
            num_heads, group, n_bh, q_len, kv_len, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
            CAUSAL: gl.constexpr, HAS_KV_LENS: gl.constexpr, HAS_Q_LENS: gl.constexpr):  # fmt: skip
    n_tiles = n_bh * gl.cdiv(q_len, pg.BLOCK_M)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    slots = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    slot_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(2):
        mbarrier.init(slot_bar.index(slot), count=1)
    q_bar, q_free, turn, kr, vr, empty = pg._barriers(STAGES)
    kb, vb = k_bufs, v_bufs
    sob, soh, som, sod = stride_ob, stride_oh, stride_om, stride_od
    gl.warp_specialize(
        [
            (_consumer, (q_smem.index(0), q_bar.index(0), q_free.index(0), kb, vb, kr, vr, empty,
                         turn.index(0), turn.index(1), slots, slot_bar, Out, KvLens, QLens, sob, soh, som,
                         sod, num_heads, n_bh, n_tiles, q_len, kv_len, qk_scale, 0, HEAD_DIM, STAGES, CAUSAL,
                         HAS_KV_LENS, HAS_Q_LENS)),
            (_consumer, (q_smem.index(1), q_bar.index(1), q_free.index(1), kb, vb, kr, vr, empty,
                         turn.index(1), turn.index(0), slots, slot_bar, Out, KvLens, QLens, sob, soh, som,
                         sod, num_heads, n_bh, n_tiles, q_len, kv_len, qk_scale, 1, HEAD_DIM, STAGES, CAUSAL,
                         HAS_KV_LENS, HAS_Q_LENS)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, q_free, kr, vr, empty, slots,
                         slot_bar, Next, KvLens, QLens, num_heads, group, n_bh, n_tiles, q_len, kv_len,
                         STAGES, CAUSAL, HAS_KV_LENS, HAS_Q_LENS)),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip
    pg._invalidate(q_bar, q_free, turn, kr, vr, empty, STAGES)
    for slot in gl.static_range(2):
        mbarrier.invalidate(slot_bar.index(slot))


def attention(q, k, v, causal=True, kv_lens=None, q_lens=None, out=None, stages=3):
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` -> `[B, Hq, Lq, D]`, as the library's persistent
    schedule."""
    batch, num_heads, q_len, head_dim = q.shape
    if kv_lens is None:
        kv_lens = torch.full((batch,), k.shape[2], dtype=torch.int32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    n_bh = batch * num_heads
    tiles = n_bh * triton.cdiv(q_len, pg.BLOCK_M.value)
    grid = (min(tiles, sm_count(q.device)),)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    _kernel[grid](
        pg._descriptor(q, pg.ROWS.value), pg._descriptor(k, pg.BLOCK_N.value),
        pg._descriptor(v, pg.BLOCK_N.value), out, kv_lens, q_lens if q_lens is not None else out, counter,
        *out.stride(), num_heads, num_heads // k.shape[1], n_bh, q_len, k.shape[2], head_dim**-0.5 * pg.LOG2E,
        HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal, HAS_KV_LENS=True, HAS_Q_LENS=q_lens is not None,
        num_warps=4,
    )  # fmt: skip
    return out


def compile_offline(head_dim=128, q_lens=False):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q = torch.zeros(2, 4, 256, head_dim, dtype=torch.bfloat16)
    descs = (pg._descriptor(q, pg.ROWS.value), pg._descriptor(q, pg.BLOCK_N.value),
             pg._descriptor(q, pg.BLOCK_N.value))  # fmt: skip
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("q_desc", "k_desc", "v_desc"), descs, strict=True)}  # fmt: skip
    ints = ("stride_ob", "stride_oh", "stride_om", "stride_od", "num_heads", "group", "n_bh", "q_len",
            "kv_len")  # fmt: skip
    sig.update(
        Out="*bf16", KvLens="*i32", QLens="*i32", Next="*i32", qk_scale="fp32", **dict.fromkeys(ints, "i32")
    )
    constants = dict(HEAD_DIM=head_dim, STAGES=3, CAUSAL=True, HAS_KV_LENS=True, HAS_Q_LENS=q_lens)
    sig.update(dict.fromkeys(constants, "constexpr"))
    sig = {name: sig[name] for name in _kernel.arg_names}
    src = GluonASTSource(fn=_kernel, signature=sig, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


PADDED_16 = [1024, 0, 900, 1, 700, 129, 0, 1023] * 2


def check() -> bool:
    """Bit for bit against the library's persistent schedule (the same work per tile, in another order),
    with and without lengths, more tiles than SMs, and 5 repeats."""
    ok = True
    for b, hq, hkv, lq, lkv, d, lens in ((2, 8, 2, 1000, 1000, 128, None), (1, 4, 4, 300, 1300, 128, None),
                                         (2, 8, 8, 777, 777, 64, None), (4, 32, 8, 2048, 2048, 128, None),
                                         (3, 8, 2, 700, 700, 128, [700, 0, 129]),
                                         (16, 32, 8, 1024, 1024, 128, PADDED_16)):  # fmt: skip
        torch.manual_seed(lq)
        q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
        out = attention(q, k, v, kv_lens=lens_t, q_lens=lens_t, out=torch.full_like(q, float("nan")))
        ref = persistent.attention(q, k, v, kv_lens=lens_t, q_lens=lens_t)
        torch.cuda.synchronize()
        same = torch.equal(out, ref)
        repeats = all(torch.equal(attention(q, k, v, kv_lens=lens_t, q_lens=lens_t), out) for _ in range(5))
        row_ok = same and repeats and bool(torch.isfinite(out).all())
        print({"shape": [b, hq, hkv, lq, lkv, d], "lens": lens, "same_as_persistent": same,
               "same_bits_5x": repeats, "ok": row_ok}, flush=True)  # fmt: skip
        ok = ok and row_ok
    return ok


def main() -> None:
    if sys.argv[1] == "compile":
        from fa_gluon import _sass_summary

        for head_dim, q_lens in ((128, False), (128, True), (64, False)):
            print(
                f"d{head_dim} q_lens={q_lens}: {_sass_summary(compile_offline(head_dim, q_lens))}", flush=True
            )
    elif sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    else:
        persistent.time_rows(sys.argv[2], {"dynamic-st3-pp": attention})


if __name__ == "__main__":
    main()
