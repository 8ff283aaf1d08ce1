"""Issue 11/15 (scratch, kept with its output): SASS instructions per weight in the K loop of
`kernels/gemv.py`'s kernel, compiled for sm_90 on a machine without a GPU (Triton's bundled ptxas): the
instructions between the loop's backward branch and its target, over the weights a thread handles per loop
step. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/gemv-packed/sass_loop.py [--packed-only]

With another commit's `src` first on PYTHONPATH it counts that commit's kernel (constants the kernel does not
take are left out; an older kernel's `GATED` is set False); `--packed-only`: the 8-bit one-row case only.
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
from compile_packed import BIN, registers  # noqa: E402

from attnforge.kernels import gemv  # noqa: E402

OPCODE = re.compile(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def compile_kernel(rows, block_n, block_k, warps, bits=16, dot=False, ahead=False):
    span = min(block_k, 64) if bits != 16 else block_k  # group 64
    chunk = min(8, span) if rows == 1 else span  # as gemv._chunk
    kernel = gemv._gemv_kernel
    packed = bits != 16
    constants = dict(ROWS=max(16 if dot else 1, rows), BLOCK_N=block_n, BLOCK_K=block_k, NORM=False,
                     HAS_BIAS=False, HAS_RES=False, USE_PDL=True, DOT=dot, FP32_DOT=False,
                     GLU=False, AHEAD=ahead, ASM=True, BITS=bits, GROUP=64 if packed else 1,
                     SPAN=64 if packed else 1, CHUNK=chunk, GATED=False)  # fmt: skip
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    types = {"X": "*bf16", "W": "*u8" if packed else "*bf16", "Bias": "*bf16", "Gain": "*bf16",
             "Res": "*bf16", "Y": "*bf16", "Scales": "*bf16",
             "Zeros": "*u8" if packed else "*bf16"}  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = (
            "constexpr" if name in constants else types.get(name, "fp32" if name == "eps" else "i32")
        )
        if signature[name].startswith("*") or name.startswith("stride_") or name in ("N", "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": True}
    )


def loop_counts(compiled) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each loop (a backward branch and its target) in the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", file.name], capture_output=True,
                          text=True).stdout.splitlines()  # fmt: skip
    body = [(int(m.group(1), 16), m.group(2), line) for line in sass if (m := OPCODE.search(line))]
    loops = []
    for at, _, line in body:
        branch = re.search(r"BRA (0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < at:
            ops = collections.Counter(op for a, op, _ in body if int(branch.group(1), 16) <= a <= at)
            loops.append((sum(ops.values()), ops))
    return loops


CASES = [  # (label, rows, block_n, block_k, warps, bits, dot, ahead)
    ("bf16, 1 row", 1, 4, 2048, 8, 16, False, False),
    ("4-bit, 1 row", 1, 4, 1024, 4, 4, False, False),
    ("5-bit, 1 row", 1, 4, 1024, 4, 5, False, False),
    ("5-bit, 1 row, ahead", 1, 4, 1024, 4, 5, False, True),
    ("8-bit, 1 row", 1, 4, 1024, 4, 8, False, False),
    ("8-bit, 1 row, ahead", 1, 8, 1024, 4, 8, False, True),
    ("bf16, 8 rows", 8, 4, 1024, 4, 16, False, False),
    ("8-bit, 8 rows", 8, 4, 1024, 4, 8, False, False),
    ("5-bit, 8 rows", 8, 4, 1024, 4, 5, False, False),
    ("bf16, 8 rows, tensor cores", 8, 32, 512, 8, 16, True, False),
    ("bf16, 8 rows, tensor cores, ahead", 8, 32, 512, 8, 16, True, True),
]


def main():
    cases = [case for case in CASES if case[0] == "8-bit, 1 row"] if "--packed-only" in sys.argv else CASES
    for label, rows, block_n, block_k, warps, bits, dot, ahead in cases:
        compiled = compile_kernel(rows, block_n, block_k, warps, bits, dot, ahead)
        weights = block_n * block_k / (32 * warps)
        for count, ops in loop_counts(compiled):
            print(f"{label:36s} {block_n}x{block_k}w{warps} {registers(compiled)}: loop {count} instr., "
                  f"{weights:.0f} weights a thread -> {count / weights:.1f} a weight; "
                  f"{', '.join(f'{op} {n}' for op, n in ops.most_common(12))}")  # fmt: skip


if __name__ == "__main__":
    main()
