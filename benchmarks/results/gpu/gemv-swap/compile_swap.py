"""Issue 11 (no GPU): the swapped skinny linear (`gemv._swap_kernel`; probe.py's at 16edd12) compiled for
sm_90 with Triton 3.6's ptxas: registers, spills, shared memory and the instruction mix of its product loop
(wgmma or not). Run from this directory with the package and Triton 3.6 on PYTHONPATH:

    python compile_swap.py
"""

import os
import sys

import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "cpu", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402
from sass_loop import loop_counts  # noqa: E402

from attnforge.kernels.gemv import _swap_kernel  # noqa: E402
from attnforge.kernels.tma import TensorDescriptor  # noqa: E402

TYPES = {"X": "*bf16", "W": "*bf16", "WRaw": "*bf16", "Bias": "*bf16", "Gain": "*bf16", "Res": "*bf16",
         "Y": "*bf16", "Part": "*fp32", "Counters": "*i32", "eps": "fp32"}  # fmt: skip


def compile_case(block_n, block_k, warps, stages, split_k, norm, tma, glu=False):
    constants = dict(ROWS=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, NORM=norm, HAS_RES=not norm,
                     GLU=glu, USE_TMA=tma, USE_PDL=True, FP32_DOT=False, HAS_BIAS=False,
                     EARLY=False, PREFETCH=False)  # fmt: skip
    types = dict(TYPES)
    if tma:
        w = torch.zeros(4096, 1024, dtype=torch.bfloat16)
        desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [block_n, block_k])
        types["W"] = native_specialize_impl(BaseBackend, desc, False, True, True)[0]
    options = {"num_warps": warps, "num_stages": stages, "launch_pdl": True}
    return compile_sm90(_swap_kernel, constants, types, options)


def main():
    cases = [
        (n, k, w, st, split, norm, tma, False)
        for n, k, w, st in ((64, 128, 4, 4), (128, 256, 4, 3), (128, 128, 8, 4))
        for split, norm, tma in ((1, True, True), (4, False, True), (1, True, False))
    ]
    # glu: the gate and up tiles a slice, the norm before
    cases += [(64, 128, 4, 4, 1, True, True, True), (128, 128, 4, 3, 1, True, True, True),
              (64, 128, 4, 4, 4, True, True, True)]  # fmt: skip
    for block_n, block_k, warps, stages, split_k, norm, tma, glu in cases:
        compiled = compile_case(block_n, block_k, warps, stages, split_k, norm, tma, glu)
        label = (f"{block_n}x{block_k}w{warps}st{stages}k{split_k}{'-tma' if tma else ''} "
                 f"{'norm' if norm else 'residual'}{' glu' if glu else ''}")  # fmt: skip
        print(f"{label}: {registers(compiled)} shared {compiled.metadata.shared} B", flush=True)
        for count, ops in loop_counts(compiled):
            print(f"  loop {count} instr.: {', '.join(f'{op} {n}' for op, n in ops.most_common(10))}")


if __name__ == "__main__":
    main()
