"""Issue 15 (scratch, kept with its output): a sketch of the 8-bit loop that reads the codes as 32-bit words
(four codes a load element) and decodes four byte planes per word (a shift and one OR with 0x4B000000's bits
each), with x split into the four matching planes (`tl.split`) and the zero folded in as zero * sum(x) per
group; one row, no norm, no PDL. Compiled for sm_90 on a machine without a GPU and counted per loop step as
`sass_loop.py` counts the kernel's. Not the project's kernel: a candidate for the next rewrite (runbook).

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/gemv-packed/words_sketch.py
"""

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
from compile_packed import registers  # noqa: E402
from sass_loop import loop_counts  # noqa: E402


@triton.jit
def _magic(c):
    return (c | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _words_kernel(X, W, S, Z, Y, K, stride_w, stride_s,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    quarter: tl.constexpr = BLOCK_K // 4
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    words_ptr = W.to(tl.pointer_type(tl.uint32))
    j = tl.arange(0, quarter)
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = tl.load(words_ptr + cols[:, None] * (stride_w // 4) + (k0 // 4 + j)[None, :])
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        scale = tl.load(S + cols[:, None] * stride_s + g[None, :]).to(tl.float32)
        zero = tl.load(Z + cols[:, None] * stride_s + g[None, :]).to(tl.float32)
        x = tl.load(X + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, [quarter, 2, 2]))  # x[4j + 2a + b]: even b = 0, odd b = 1
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        dot = (_magic((words & 0xFF).to(tl.int32)) - 8388608.0) * x0[None, :]
        dot += (_magic(((words >> 8) & 0xFF).to(tl.int32)) - 8388608.0) * x1[None, :]
        dot += (_magic(((words >> 16) & 0xFF).to(tl.int32)) - 8388608.0) * x2[None, :]
        dot += (_magic((words >> 24).to(tl.int32)) - 8388608.0) * x3[None, :]
        per_group = tl.sum(tl.reshape(dot, [BLOCK_N, BLOCK_K // GROUP, GROUP // 4]), axis=2)
        x_sum = tl.sum(tl.reshape(x, [BLOCK_K // GROUP, GROUP]), axis=1)
        acc += scale * (per_group - zero * x_sum[None, :])
    tl.store(Y + cols, tl.sum(acc, axis=1).to(tl.bfloat16))


def compile_sketch(block_n, block_k, warps):
    types = {"X": "*bf16", "W": "*u8", "S": "*bf16", "Z": "*u8", "Y": "*bf16"}
    constants = {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": 64}
    signature = {name: types.get(name, "constexpr" if name in constants else "i32")
                 for name in _words_kernel.arg_names}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    source = ASTSource(fn=_words_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


if __name__ == "__main__":
    for block_n, block_k, warps in ((4, 1024, 4), (8, 1024, 4)):
        compiled = compile_sketch(block_n, block_k, warps)
        weights = block_n * block_k / (32 * warps)
        for count, ops in loop_counts(compiled):
            print(f"words sketch {block_n}x{block_k}w{warps} {registers(compiled)}: loop {count} instr., "
                  f"{weights:.0f} codes a thread -> {count / weights:.1f} a code; "
                  f"{', '.join(f'{op} {n}' for op, n in ops.most_common(12))}")  # fmt: skip
