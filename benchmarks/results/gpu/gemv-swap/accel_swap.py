"""Issue 11 (scratch): the accelerator's batch-8 step with its eight-row products through the swapped kernel.

`probe.py time` gives each shape's fastest swapped launch set at 8 rows. Here `gemv.launch_linear` (what
`fused_linear` and its compiled op run) is replaced for 2-16 rows of bf16 against a plain weight without a
bias by that set (`probe.SwapLinear`, norm / residual / glu fused as the library's), every other call as
before, `gemv.FAST_ROWS` raised to 16, and `bench accel` runs in this process: its `attnforge` row is then
the swapped step, `attnforge-torch-projections` the model's matmuls (cuBLAS), as runbook23's q step.

    python accel_swap.py TIMES.json OUT_DIR STEM [MODEL] [PROMPT]   # from this directory, PYTHONPATH with src
"""

import json
import sys

import probe
import torch

from attnforge.cli import app
from attnforge.kernels import gemv


def best_sets(path: str) -> dict:
    """(outputs, K, glu) -> the fastest swapped launch at 8 rows in `probe.py time`'s file."""
    out = {}
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    for row in rows:
        if row["rows"] != 8:
            continue
        glu = "glu" in row["fused"]
        launch = probe.launches(row["N"], row["K"], row["fused"])[row["best"]]
        out[(row["N"] // 2 if glu else row["N"], row["K"], glu)] = launch
        print(f"{row['shape']}: {row['best']} {row['best_us']:.2f} us (cuBLAS + torch ops "
              f"{row['torch_fused_us']:.2f})")  # fmt: skip
    return out


def patch(sets: dict) -> None:
    library = gemv.launch_linear

    def launch(x, weight, bias, gain, eps, residual, out, params=None, glu=False):
        rows, n = out.numel() // max(out.shape[-1], 1), out.shape[-1]
        swap = None
        if 1 < rows <= 16 and bias is None and isinstance(weight, torch.Tensor) and x.dtype == torch.bfloat16:
            swap = sets.get((n, weight.shape[1], glu))
        if swap is None or params is not None:
            return library(x, weight, bias, gain, eps, residual, out, params, glu)
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        res2 = None if residual is None else residual.reshape(rows, n).contiguous()
        swap(x2, weight.contiguous(), gain, eps, res2, out=out.view(rows, n))

    gemv.launch_linear = launch
    gemv.FAST_ROWS = 16


if __name__ == "__main__":
    times, out_dir, stem = sys.argv[1:4]
    model = sys.argv[4] if len(sys.argv) > 4 else "qwen3-0.6b"
    prompt = sys.argv[5] if len(sys.argv) > 5 else "128"
    patch(best_sets(times))
    app(["bench", "accel", "--model", model, "--batch", "8", "--prompt-tokens", prompt, "--new-tokens", "256",
         "--runs", "3", "--time-budget", "200", "--out", out_dir, "--stem", stem,
         "--rows", "attnforge,attnforge-torch-projections"], standalone_mode=False)  # fmt: skip
