# ruff: noqa: E501  (scratch kernels as they ran on the device, 2026-12-07)
import sys
import time

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from triton.tools.tensor_descriptor import TensorDescriptor

which, causal = sys.argv[1], sys.argv[2] == "1"
q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = torch.empty_like(q)
t = time.time()
s = [
    q.stride(0),
    q.stride(1),
    q.stride(2),
    k.stride(0),
    k.stride(1),
    k.stride(2),
    v.stride(0),
    v.stride(1),
    v.stride(2),
    out.stride(0),
    out.stride(1),
    out.stride(2),
]
if which == "D":
    import kd

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    kd._ws_kernel[(8, 8)](
        q,
        k,
        v,
        out,
        *s,
        128**-0.5 * 1.4427,
        1024,
        1024,
        8,
        GROUP=1,
        HEAD_DIM=128,
        BLOCK_M=128,
        BLOCK_N=128,
        CAUSAL=causal,
        WS=True,
        num_warps=4,
        num_stages=2,
    )
else:
    import kg

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    dq = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, 128, 128])
    dk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, 128, 128])
    dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, 128, 128])
    kg._ws_kernel[(8, 8)](
        dq,
        dk,
        dv,
        out,
        *s,
        128**-0.5 * 1.4427,
        1024,
        1024,
        8,
        GROUP=1,
        HEAD_DIM=128,
        BLOCK_M=128,
        BLOCK_N=128,
        CAUSAL=causal,
        WS=True,
        num_warps=4,
        num_stages=2,
    )
torch.cuda.synchronize()
ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
print(which, causal, f"{time.time() - t:.1f} s", ((out.float() - ref).norm() / ref.norm()).item(), flush=True)
