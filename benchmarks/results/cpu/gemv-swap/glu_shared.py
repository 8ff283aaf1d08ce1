"""Shared memory of the swapped product's glu sets (`gemv._swap_params`: 64 x 256 to 4096 outputs, 128 x 128
above) compiled for sm_90 (Triton 3.6, no GPU), with and without the fused RMSNorm and with and without
`early`, against the 232448 bytes (227 KB) an H100 block may take. Beside the norm the rows are not staged
in shared memory, which is why `_swap_params` reads the glu sets early only there. Run from the repository
root:

    PYTHONPATH=<triton 3.6>:src python benchmarks/results/cpu/gemv-swap/glu_shared.py
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from swap_sass import compile_case  # noqa: E402

from attnforge.kernels import gemv  # noqa: E402

LIMIT = 232448
# name: (outputs, K), gate/up as Qwen3-0.6B's and Llama-3-8B's
CASES = {"qwen3-0.6b gate_up": (3072, 1024), "llama3-8b gate_up": (14336, 4096)}


def main() -> None:
    for name, (outputs, k) in CASES.items():
        for norm in (True, False):
            for early in (False, True):
                p = dataclasses.replace(gemv._swap_params(outputs, k, True, True, 132), early=early)
                shared = compile_case(outputs, k, True, norm, p).metadata.shared
                fits = "fits" if shared <= LIMIT else "TOO MUCH"
                print(f"{name:18s} {'norm' if norm else 'no norm':7s} {'early' if early else 'plain':5s} "
                      f"{p.block_n}x{p.block_k} shared {shared:6d} {fits}")  # fmt: skip


if __name__ == "__main__":
    main()
