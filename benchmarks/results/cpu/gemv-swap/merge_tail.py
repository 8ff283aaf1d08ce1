"""Issue 11 (scratch, kept with its output): the swapped product's split merge as sm_90 SASS, compiled on a
machine without a GPU (Triton's bundled ptxas), for the batch-8 step's products at 8 rows (Qwen3-0.6B's
q/k/v, o and down, Llama-3-8B's o and down: the defaults `gemv.default_params` gives), as stored and with
`GemvParams.narrow_merge`. After the arrival counter's atomic: the registers and the loads of the partials
in runs, a run ending where float work that may wait on it starts (each run one round trip to L2 at least).
Run from the repository root:

    PYTHONPATH=<triton 3.6 site>:src python benchmarks/results/cpu/gemv-swap/merge_tail.py
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import load_runs_after_atomic, registers  # noqa: E402

from attnforge.kernels import gemv, offline  # noqa: E402

# name -> (weight rows, K, norm, residual): as the batch-8 step calls them
PRODUCTS = {"qwen3-0.6b q/k/v": (4096, 1024, True, False), "qwen3-0.6b o": (1024, 2048, False, True),
            "qwen3-0.6b down": (1024, 3072, False, True), "llama3-8b o": (4096, 4096, False, True),
            "llama3-8b down": (4096, 14336, False, True)}  # fmt: skip


def tail_runs(n: int, k: int, norm: bool, residual: bool, narrow: bool) -> tuple[int, str, list[int]]:
    p = gemv.default_params(8, n, k, norm=norm, tma=True, sms=132)
    p = dataclasses.replace(p, narrow_merge=narrow)
    compiled = offline.swap_kernel_sm90(n, k, p, False, norm, residual=residual)
    runs = load_runs_after_atomic(compiled)
    return gemv.swap_split(k, p.block_k, p.split_k)[1], registers(compiled), runs


def main():
    for narrow in (False, True):
        print("narrow_merge" if narrow else "as stored")
        for name, shape in PRODUCTS.items():
            split, regs, runs = tail_runs(*shape, narrow)
            print(f"  {name}: {split} splits, {regs}; partial loads in runs {runs}")


if __name__ == "__main__":
    main()
