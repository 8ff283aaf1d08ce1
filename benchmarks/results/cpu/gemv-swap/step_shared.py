"""Shared memory a program of each kernel of Qwen3-0.6B's batch-8 decode step takes, compiled for sm_90
(Triton 3.6, no GPU), against the 232448 bytes (227 KB) an H100 block may take and the 228 KB of an SM: two
neighbours whose programs fit one SM together can overlap under PDL (the next kernel's programs start, and
read their weights early, while the last programs of the one before run). Rows:
  - the four swapped products at their default sets and, where `swap_ab.variants` has them, `st-fit` (no
    more stages than a split's loop reads) and gate/up's `2x-split-st-fit`;
  - the glu sets (Qwen3-0.6B's and Llama-3-8B's gate/up) with and without the fused norm and `early`:
    beside the norm the rows are not staged in shared memory, which is why `_swap_params` reads them early
    only there;
  - the attention step at the tuned batch-8 launch (16-row M block, 128-key tiles, 2 stages) on the pointer
    path (the TMA path's descriptors are not built offline; its tiles take the same buffers).
Run from the repository root:

    PYTHONPATH=<triton 3.6>:src python benchmarks/results/cpu/gemv-swap/step_shared.py
"""

import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [
    HERE,
    os.path.join(HERE, "..", "decode-tma"),
    os.path.join(HERE, "..", "..", "gpu", "gemv-swap"),
]
import pointer_path_same  # noqa: E402
import swap_ab  # noqa: E402
from compile_packed import compile_sm90  # noqa: E402
from swap_sass import CASES, compile_case  # noqa: E402

from attnforge.kernels import decode_step, gemv  # noqa: E402

LIMIT = 232448
GLU = {"qwen3-0.6b gate_up": (3072, 1024), "llama3-8b gate_up": (14336, 4096)}  # outputs, K
STEP = dict(GROUP=2, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=128, SPLIT=True,
            SPLITS_P2=4, PART_ROWS=2, S_CHUNK=4, FP32_DOT=False, USE_PDL=True, ALONE_TILES=0, NUM_HEADS=16,
            Q_NORM=True, K_NORM=True, USE_TMA=False)  # fmt: skip


def show(name: str, shared: int) -> None:
    print(f"{name:44s} shared {shared:6d} {'fits' if shared <= LIMIT else 'TOO MUCH'}", flush=True)


def main() -> None:
    for name, (outputs, k, glu, norm) in CASES.items():
        launches = swap_ab.variants(2 * outputs if glu else outputs, k, glu, norm, True, 132)
        for label in ("default", "st-fit", "2x-split-st-fit"):
            if label in launches:
                q = launches[label]
                shared = compile_case(outputs, k, glu, norm, q).metadata.shared
                show(f"qwen3-0.6b {name} {label} (stages {q.num_stages})", shared)
    for name, (outputs, k) in GLU.items():
        for norm in (True, False):
            for early in (False, True):
                p = dataclasses.replace(gemv._swap_params(outputs, k, True, True, 132), early=early)
                label = f"{name} {'norm' if norm else 'no norm'} {'early' if early else 'plain'}"
                show(label, compile_case(outputs, k, True, norm, p).metadata.shared)
    options = {"num_warps": 4, "num_stages": 2, "launch_pdl": True}
    step = compile_sm90(decode_step._decode_step_kernel, STEP, pointer_path_same.TYPES, options)
    show("qwen3-0.6b attention step m16 n128 st2", step.metadata.shared)


if __name__ == "__main__":
    main()
