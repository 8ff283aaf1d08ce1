"""Issue 11 (scratch): Qwen3-0.6B's batch-8 step with each product's fastest launch of `swap_ab.py`, against
the library's default, in one process on one GPU.

`bench accel` runs three times in this process on the same model: the library as committed (`attnforge`,
and `attnforge-torch-projections`: the model's matmuls); then with `gemv.default_params` patched so that
2-16 rows against each shape of the A/B take that shape's fastest checked variant there (early, prefetch,
twice the split, a narrow tile, or the LM head through the swapped product), every other call as before;
then also with `decode_step.WARM_TILES = 2` (each split's first two tiles of cached keys and values asked of
the L2 before the PDL wait). The step's kernels are built after each patch, so each run takes its sets.
Only a probe: the library's defaults change after it, with their tests.

    python accel_sets.py SWAP_AB.json OUT_DIR   # from this directory, PYTHONPATH with src (about 4 minutes)
    python accel_sets.py warm-b1 OUT_DIR        # batch 1, prompts 128 and 4096: WARM_TILES 0, then 2

The second form is the batch-1 check before `WARM_TILES` goes on by default: the library's step at batch 1
(Qwen3-0.6B, the issue's prompts), then the same with the attention step's first key tiles warmed.
"""

import json
import sys

import torch

from attnforge.cli import app
from attnforge.kernels import decode_step, gemv

LIBRARY = gemv.default_params
BASELINES = ("cublas", "torch_ops")


def fastest(path: str) -> dict:
    """(weight rows, K, glu) -> the fastest variant's GemvParams among those within bf16's error."""
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    out = {}
    for row in rows:
        timed = {label: t for label, t in row["us"].items() if label not in BASELINES}
        good = [label for label in timed if row["rel_l2"][label] < 2e-2]
        best = min(good, key=timed.get)
        out[(row["N"], row["K"], "glu" in row["fused"])] = gemv.GemvParams(**row["params"][best])
        print(f"{row['shape']}: {best} {timed[best]:.2f} us (default {timed['default']:.2f})", flush=True)
    return out


def patch(sets: dict) -> None:
    def default_params(rows, n, k, bits=16, dtype=torch.bfloat16, *, glu=False, tma=False, sms=132):
        found = sets.get((n, k, glu)) if 1 < rows <= 16 and bits == 16 and tma else None
        return found or LIBRARY(rows, n, k, bits, dtype, glu=glu, tma=tma, sms=sms)

    gemv.default_params = default_params


def bench(out_dir: str, stem: str, rows: str, batch: int = 8, prompts: str = "128") -> None:
    app(["bench", "accel", "--model", "qwen3-0.6b", "--batch", str(batch), "--prompt-tokens", prompts,
         "--new-tokens", "256", "--runs", "3", "--time-budget", "120", "--out", out_dir, "--stem", stem,
         "--rows", rows], standalone_mode=False)  # fmt: skip


def warm_b1(out: str) -> None:
    for tiles in (0, 2):
        decode_step.WARM_TILES = tiles
        bench(out, f"b1-warm{tiles}", "attnforge", batch=1, prompts="128,4096")


if __name__ == "__main__":
    ab, out = sys.argv[1:3]
    if ab == "warm-b1":
        warm_b1(out)
        sys.exit(0)
    sets = fastest(ab)
    bench(out, "b8-default", "attnforge,attnforge-torch-projections")
    patch(sets)
    bench(out, "b8-fastest", "attnforge")
    decode_step.WARM_TILES = 2
    bench(out, "b8-fastest-warm", "attnforge")
