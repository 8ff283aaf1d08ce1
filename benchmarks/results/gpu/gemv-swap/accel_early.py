"""Issue 11 (scratch): Qwen3-0.6B's batch-8 step with the swapped product's early launch, against the
library's default, in one process on one GPU.

`bench accel` runs three times in this process on the same model: the library as committed (`attnforge`, and
`attnforge-torch-projections`: the model's matmuls); then with `gemv._swap_params` patched to set `early`
(each split's first weight slice read before the PDL wait); then early with twice the split for the products
that split K (each program's share read sooner). The step's kernels are built after each patch, so each run
takes the sets it names. Only a probe: the library changes after the A/B (`early_ab.py`) and this agree.

    python accel_early.py OUT_DIR   # from this directory, PYTHONPATH with src (about 3 minutes)
"""

import dataclasses
import sys

from attnforge.cli import app
from attnforge.kernels import gemv

LIBRARY = gemv._swap_params


def early(outputs: int, k: int, glu: bool, sms: int) -> gemv.GemvParams:
    return dataclasses.replace(LIBRARY(outputs, k, glu, sms), early=True)


def early_2x_split(outputs: int, k: int, glu: bool, sms: int) -> gemv.GemvParams:
    p = LIBRARY(outputs, k, glu, sms)
    return dataclasses.replace(p, early=True, split_k=2 * p.split_k if p.split_k > 1 else 1)


def bench(out_dir: str, stem: str, rows: str) -> None:
    app(["bench", "accel", "--model", "qwen3-0.6b", "--batch", "8", "--prompt-tokens", "128", "--new-tokens",
         "256", "--runs", "3", "--time-budget", "120", "--out", out_dir, "--stem", stem, "--rows", rows],
        standalone_mode=False)  # fmt: skip


if __name__ == "__main__":
    out = sys.argv[1]
    bench(out, "b8-default", "attnforge,attnforge-torch-projections")
    for name, sets in (("early", early), ("early-2x-split", early_2x_split)):
        gemv._swap_params = sets
        bench(out, f"b8-{name}", "attnforge")
