"""Issue 14 (scratch, kept with its output): the prefill kernel's sm_90 SASS at m128-n64-w8-st3 (GQA 4,
d128, bf16, causal), compiled on a machine without a GPU (Triton 3.6's bundled ptxas), with and without
28e3d37's `OVERLAP` (reverted): registers, shared memory, and the order of the tensor-core, wait,
exponential and barrier instructions. Run from the repository root with 28e3d37's sources first on the path:

    git archive 28e3d37 src | tar x -C /tmp/pf28
    PYTHONPATH=/tmp/pf28/src:<triton 3.6 site> python benchmarks/results/cpu/prefill-overlap/sass_order.py
"""

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import BIN, compile_sm90, registers  # noqa: E402

from attnforge.kernels import prefill  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "QLens": "*i32",
         "Mask": "*bf16", "scale_log2": "fp32"}  # fmt: skip
KEPT = re.compile(r"HGMMA|WARPGROUP|MUFU\.EX2|BRA|BAR\.SYNC|DEPBAR")


def compile_case(overlap: bool):
    kernel = prefill._prefill_kernel
    constants = dict(GROUP=4, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=128, BLOCK_N=64, CAUSAL=True,
                     HAS_KV_LENS=False, HAS_Q_LENS=False, MASK_KIND=0, USE_TMA=False, FP32_DOT=False,
                     OVERLAP=overlap, stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)  # fmt: skip
    return compile_sm90(kernel, constants, TYPES, {"num_warps": 8, "num_stages": 3})


def order(compiled) -> list[str]:
    """The kept instructions in program order, runs of one opcode counted."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", file.name], capture_output=True,
                          text=True).stdout  # fmt: skip
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    runs: list[list] = []
    for op in (o for o in ops if KEPT.match(o)):
        if runs and runs[-1][0] == op:
            runs[-1][1] += 1
        else:
            runs.append([op, 1])
    return [f"{op} x{n}" for op, n in runs]


def main():
    for overlap in (False, True):
        compiled = compile_case(overlap)
        print(f"OVERLAP={overlap}: {registers(compiled)} shared {compiled.metadata.shared} B")
        print("  " + ", ".join(order(compiled)))


if __name__ == "__main__":
    main()
