"""Issue 14 probe (scratch): does the warp-specialized prefill launch compile and finish on the GPU? Run each
mode in its own process under `timeout` (a partitioned kernel that deadlocks never returns):
    python ws_probe.py ours <causal 0|1> <BLOCK_N> <stages> [lens] | tutorial | time
"ours": prefill's "ws" launch (`lens`: with kv_lens, all keys valid); "tutorial": a minimal non-causal
warp-specialized attention loop with descriptors made on the device. Prints the seconds to the first
finished call (compile included) and the error against SDPA. "time": a first speed reading, causal GQA 32:8
d128 bf16 (B=2 L=8192, B=8 L=2048): the "ws" launch, the stored launch and SDPA with enable_gqa, and the
"ws" and stored launches on a Q in transformers' layout (what the copy of Q costs), interleaved after an L2
flush (the grid is the measurement that counts). Results: benchmarks/results/h100/
prefill-ws/."""

import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _tutorial(
    Q, K, V, Out, sm_scale, N_CTX, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    y_dim = tl.num_programs(1) * N_CTX
    dq = tl.make_tensor_descriptor(
        Q, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )
    dk = tl.make_tensor_descriptor(
        K, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    dv = tl.make_tensor_descriptor(
        V, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    off = off_hz * N_CTX
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = dq.load([off + start_m * BLOCK_M, 0])
    qk_scale = sm_scale * 1.44269504
    for start_n in tl.range(0, N_CTX, BLOCK_N, warp_specialize=True):
        k = dk.load([off + start_n, 0]).T
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(tl.bfloat16), dv.load([off + start_n, 0]), acc)
        m_i = m_ij
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = Out + (off + rows)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o, (acc / l_i[:, None]).to(tl.bfloat16))


def row_calls(q, k, v, out) -> dict:
    """The calls timed for one row: the stored launch, SDPA with enable_gqa, the "ws" launch (128x128, 2
    stages), and the "ws" and stored launches on the same Q in transformers' layout (heads interleaved in a
    row: the "ws" launch copies it first)."""
    from attnforge.kernels.prefill import _prefill_into, prefill_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q_hf = q.transpose(1, 2).contiguous().transpose(1, 2)
    ws = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "ws": True}
    return {
        "stored": lambda: prefill_attention(q, k, v, causal=True, out=out),
        "sdpa-gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
        "ws-n128-st2": lambda: _prefill_into(q, k, v, out, 128**-0.5, True, None, None, None, ws),
        "ws-n128-st2 q-interleaved": lambda: _prefill_into(
            q_hf, k, v, out, 128**-0.5, True, None, None, None, ws
        ),
        "stored q-interleaved": lambda: prefill_attention(q_hf, k, v, causal=True, out=out),
    }


def time_rows() -> None:
    from attnforge.bench.timing import summarize, time_interleaved

    for batch, length in ((2, 8192), (8, 2048)):
        q = torch.randn(batch, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * batch * 32 * length * length / 2 * 128
        for name, samples in time_interleaved(row_calls(q, k, v, torch.empty_like(q)), reps=20).items():
            us = summarize(samples)["median_us"]
            print(f"B={batch} L={length} {name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s", flush=True)


def main():
    torch.manual_seed(0)
    mode = sys.argv[1]
    if mode == "time":
        time_rows()
        return
    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    start = time.time()
    if mode == "tutorial":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _tutorial[(8, 8)](
            q, k, v, out, 128**-0.5, 1024, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2
        )
        causal = False
    else:
        from attnforge.kernels.prefill import _prefill_into

        causal = sys.argv[2] == "1"
        params = {
            "BLOCK_M": 128,
            "BLOCK_N": int(sys.argv[3]),
            "num_warps": 4,
            "num_stages": int(sys.argv[4]),
            "ws": True,
        }
        kv_lens = torch.full((1,), 1024, device="cuda") if sys.argv[5:] == ["lens"] else None
        _prefill_into(q, k, v, out, 128**-0.5, causal, kv_lens, None, None, params)
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"{' '.join(sys.argv[1:])}: finished in {time.time() - start:.1f} s, rel L2 {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
