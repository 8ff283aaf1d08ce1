"""The library's GEMV kernel compiled for sm_90 (Triton 3.6's ptxas, no GPU) at four launches that fuse the
RMSNorm (one row; one row with glu and read-ahead; 16 rows on the tensor cores; 8-bit codes with a
residual): each launch's SASS written to DIR, to compare two commits' files (`rms-scale-same-20261207.txt`).
Run from the repository root:

    PYTHONPATH=<triton 3.6 site>:src python benchmarks/results/cpu/gemv-swap/sass_dump.py DIR
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemv-packed"))
from compile_packed import compile_sm90  # noqa: E402

from attnforge.kernels import gemv  # noqa: E402

TYPES = {"X": "*bf16", "W": "*bf16", "Bias": "*bf16", "Gain": "*bf16", "Res": "*bf16", "Y": "*bf16",
         "Scales": "*bf16", "Zeros": "*bf16", "eps": "fp32"}  # fmt: skip
BASE = dict(HAS_BIAS=False, HAS_RES=False, USE_PDL=True, FP32_DOT=False, NORM=True, BITS=16, GROUP=1, SPAN=1,
            ASM=True, GLU=False)  # fmt: skip
CASES = {
    "r1-norm": dict(ROWS=1, BLOCK_N=4, BLOCK_K=1024, DOT=False, AHEAD=False, CHUNK=8),
    "r1-norm-glu-ahead": dict(ROWS=1, BLOCK_N=16, BLOCK_K=1024, DOT=False, GLU=True, AHEAD=True, CHUNK=8),
    "r16-dot-norm": dict(ROWS=16, BLOCK_N=32, BLOCK_K=256, DOT=True, AHEAD=True, CHUNK=256),
    "r1-8bit-norm": dict(ROWS=1, BLOCK_N=8, BLOCK_K=1024, DOT=False, AHEAD=True, CHUNK=8, HAS_RES=True,
                         BITS=8, GROUP=64, SPAN=64),
}  # fmt: skip


def main(out: str) -> None:
    for name, case in CASES.items():
        constants = BASE | case
        types = TYPES | ({"W": "*u8", "Zeros": "*u8"} if constants["BITS"] == 8 else {})
        kernel = compile_sm90(gemv._gemv_kernel, constants, types, {"num_warps": 4, "launch_pdl": True})
        with open(os.path.join(out, name + ".sass"), "w") as fh:
            fh.write(kernel.asm["sass"])
        print(name, len(kernel.asm["sass"]))


if __name__ == "__main__":
    main(sys.argv[1])
