"""Issue 14 probe (scratch; run once on an H100, right and slower than the stored launch:
h100/prefill-gluon/runbook20-*): head_dim 64 with three consumer warpgroups, 192 query rows a program
(FA3's tile for d64 causal: 192 x 128). The library's Gluon launch (kernels/prefill_gluon.py, two
warpgroups, 128 x 128) loses at d64 (294-340 TFLOP/s against the stored launch's 379 at 32:32 B=4 L=4k,
h100/prefill-gluon/runbook16-*): a d64 block does half the PV work of a d128 one, so the softmax weighs
more, and a third warpgroup gives the turns one more product to hide it under.

The consumers are the library's (`_consumer`, ping-pong schedule): the "turn" passes round a ring of three
barriers (warpgroup w waits on turn w and passes to turn w + 1; only warpgroup 0's first turn needs no
arrival), and each stage is released by all three. Registers: the two worker consumers are given 160 and
the producer 24; the default partition (consumer 0) then runs at 168 (offline,
cpu/prefill-gluon/compile-d64-20261207.txt, with the spills per partition).

    python fa_gluon_d64.py compile           (no GPU: sm_90 with Triton 3.6's ptxas on PYTHONPATH)
    python fa_gluon_d64.py check             (GPU: against SDPA in float32 and 5 repeats bit for bit)
    python fa_gluon_d64.py time <out.json>   (GPU: against SDPA, the stored launch, the library's st3-pp)
Results: benchmarks/results/h100/prefill-gluon/."""

import json
import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from attnforge.kernels.prefill_gluon import BLOCK_N, LOG2E, ROWS, _consumer, _descriptor, _load_kv

PARTS = gl.constexpr(3)
BLOCK_M = gl.constexpr(192)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, b, h, kv_h, m0,
              kv_end, n_blocks, STAGES: gl.constexpr):  # fmt: skip
    """The library's `_load_partition` with three consumers' rows of Q, then the library's K/V loads."""
    for part in gl.static_range(PARTS):
        mbarrier.expect(q_bar.index(part), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0 + part * ROWS, 0], q_bar.index(part),
                                        q_smem.index(part))  # fmt: skip
    _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, empty, b, kv_h, kv_end, n_blocks, 0, STAGES)


@gluon.jit
def _kernel(q_desc, k_desc, v_desc, Out, stride_ob, stride_oh, stride_om, stride_od, num_heads, group,
            q_len, kv_len, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
            CAUSAL: gl.constexpr):  # fmt: skip
    """Plain prompts (no lengths): the library kernel's per-program scalars for 192 rows."""
    bh = gl.program_id(0)
    m0 = (gl.num_programs(1) - 1 - gl.program_id(1)) * BLOCK_M
    b = bh // num_heads
    h = bh % num_heads
    hi = kv_len
    if CAUSAL:
        hi = gl.minimum(kv_len, kv_len - q_len + gl.minimum(m0 + BLOCK_M, q_len))
    n_blocks = gl.cdiv(gl.maximum(hi, 0), BLOCK_N)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [PARTS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [PARTS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [PARTS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for part in gl.static_range(PARTS):
        mbarrier.init(q_bar.index(part), count=1)
        mbarrier.init(turn.index(part), count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=PARTS)
    fence_async_shared()
    kb, vb, kr, vr = k_bufs, v_bufs, k_ready, v_ready
    o_head = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    som, sod = stride_om, stride_od
    gl.warp_specialize(
        [
            (_consumer, (q_smem.index(0), kb, vb, q_bar.index(0), kr, vr, empty, turn.index(0), turn.index(1),
                         o_head, som, sod, m0, q_len, q_len, kv_len, n_blocks, qk_scale, HEAD_DIM, STAGES,
                         CAUSAL, True, 1)),
            (_consumer, (q_smem.index(1), kb, vb, q_bar.index(1), kr, vr, empty, turn.index(1), turn.index(2),
                         o_head, som, sod, m0 + ROWS, q_len, q_len, kv_len, n_blocks, qk_scale, HEAD_DIM,
                         STAGES, CAUSAL, True, 0)),
            (_consumer, (q_smem.index(2), kb, vb, q_bar.index(2), kr, vr, empty, turn.index(2), turn.index(0),
                         o_head, som, sod, m0 + 2 * ROWS, q_len, q_len, kv_len, n_blocks, qk_scale, HEAD_DIM,
                         STAGES, CAUSAL, True, 0)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, kb, vb, q_bar, kr, vr, empty, b, h, h // group, m0,
                         kv_len, n_blocks, STAGES)),
        ],
        [4, 4, 1],
        [160, 160, 24],
    )  # fmt: skip
    for part in gl.static_range(PARTS):
        mbarrier.invalidate(q_bar.index(part))
        mbarrier.invalidate(turn.index(part))
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(stage))
        mbarrier.invalidate(v_ready.index(stage))
        mbarrier.invalidate(empty.index(stage))


def attention(q, k, v, causal=True, out=None, stages=3):
    """q `[B, Hq, Lq, 64]`, k/v `[B, Hkv, Lkv, 64]` (Lkv >= Lq) -> `[B, Hq, Lq, 64]`."""
    batch, num_heads, q_len, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    grid = (batch * num_heads, triton.cdiv(q_len, BLOCK_M.value))
    _kernel[grid](
        _descriptor(q, ROWS.value), _descriptor(k, BLOCK_N.value), _descriptor(v, BLOCK_N.value), out,
        *out.stride(), num_heads, num_heads // k.shape[1], q_len, k.shape[2], head_dim**-0.5 * LOG2E,
        HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal, num_warps=4,
    )  # fmt: skip
    return out


def compile_offline(stages=3):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q = torch.zeros(2, 4, 256, 64, dtype=torch.bfloat16)
    descs = (_descriptor(q, ROWS.value), _descriptor(q, BLOCK_N.value), _descriptor(q, BLOCK_N.value))
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("q_desc", "k_desc", "v_desc"), descs, strict=True)}  # fmt: skip
    ints = ("stride_ob", "stride_oh", "stride_om", "stride_od", "num_heads", "group", "q_len", "kv_len")
    sig.update(Out="*bf16", qk_scale="fp32", **dict.fromkeys(ints, "i32"))
    constants = dict(HEAD_DIM=64, STAGES=stages, CAUSAL=True)
    sig.update(dict.fromkeys(constants, "constexpr"))
    src = GluonASTSource(fn=_kernel, signature=sig, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def check() -> bool:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ok = True
    for b, hq, hkv, lq, lkv, causal in ((2, 8, 8, 777, 777, True), (1, 4, 2, 300, 1300, True),
                                        (2, 8, 2, 1000, 1000, False), (1, 2, 2, 5, 5, True),
                                        (4, 32, 32, 2048, 2048, True)):  # fmt: skip
        torch.manual_seed(lq)
        q = torch.randn(b, hq, lq, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lkv, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = attention(q, k, v, causal, out=torch.full_like(q, math.nan))
        torch.cuda.synchronize()
        kf, vf = (t.float().repeat_interleave(hq // hkv, 1) for t in (k, v))
        mask = torch.ones(lq, lkv, dtype=torch.bool, device="cuda").tril(lkv - lq) if causal else None
        ref = sdpa(q.float(), kf, vf, attn_mask=mask)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        same = all(torch.equal(attention(q, k, v, causal), out) for _ in range(5))
        row_ok = err < 1e-2 and same and bool(torch.isfinite(out).all())
        print({"shape": [b, hq, hkv, lq, lkv], "causal": causal, "rel_l2": err, "same_bits_5x": same,
               "ok": row_ok}, flush=True)  # fmt: skip
        ok = ok and row_ok
    return ok


def _calls(q, k, v, out) -> dict:
    from attnforge.kernels import prefill

    sdpa = torch.nn.functional.scaled_dot_product_attention
    library = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, gluon=True, pingpong=True)
    return {"sdpa-gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
            "stored": lambda: prefill.prefill_attention(q, k, v, out=out),
            "library-st3-pp": lambda: prefill._prefill_into(q, k, v, out, 0.125, True, None, None, None,
                                                            library),
            "three-wg-st3": lambda: attention(q, k, v, out=out)}  # fmt: skip


def time_rows(path: str) -> None:
    from attnforge.bench.timing import summarize, time_interleaved

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}  # fmt: skip
    for batch, length in ((32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)):
        q, k, v = (torch.randn(batch, 32, length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * 32 * length * length / 2 * 64
        for name, samples in time_interleaved(_calls(q, k, v, torch.empty_like(q)), reps=20).items():
            us = summarize(samples)["median_us"]
            doc["rows"].append(dict(batch=batch, length=length, call=name, us=us, tflops=flops / us / 1e6))
            print(
                f"B={batch} 32:32 d64 L={length} {name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s",
                flush=True,
            )
            with open(path, "w") as fh:
                json.dump(doc, fh, indent=1)


def main() -> None:
    if sys.argv[1] == "compile":
        from fa_gluon import _sass_summary

        for stages in (2, 3, 4):
            print(f"d64 st{stages}: {_sass_summary(compile_offline(stages))}")
    elif sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    else:
        time_rows(sys.argv[2])


if __name__ == "__main__":
    main()
