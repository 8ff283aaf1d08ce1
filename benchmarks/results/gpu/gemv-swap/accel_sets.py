"""Issue 11 (scratch): Qwen3-0.6B's batch-8 step with each product's fastest launch of `swap_ab.py`, against
the library's default, in one process on one GPU.

`bench accel` runs in this process on the same model: the library as committed (`attnforge`, and
`attnforge-torch-projections`: the model's matmuls); then, for each SPEC, with `gemv.default_params`
patched so that 2-16 rows against each shape of the A/B take that shape's fastest checked variant there
("fastest", the default) or the first of SPEC's comma-separated labels the shape has, every other call as
before. The step's kernels are built after each patch, so each run takes its sets. Only a probe: the
library's defaults change after it, with their tests.

    python accel_sets.py SWAP_AB.json OUT_DIR [SPEC ...]  # from this directory, PYTHONPATH with src
    # (about 1.5 minutes a run), e.g. SPECs: fastest  st-fit  2x-split-st-fit,st-fit

Its run at 5468eca (h100/swap-ab-20261207) also took a third row, the attention step's first key and value
tiles asked of the L2 before its PDL wait (`decode_step.WARM_TILES = 2`), and a batch-1 form with it off
and on: slower at both batches, so that code was removed.
"""

import json
import sys

import torch

from attnforge.cli import app
from attnforge.kernels import gemv

LIBRARY = gemv.default_params
BASELINES = ("cublas", "torch_ops")


def chosen(path: str, spec: str = "fastest") -> dict:
    """(weight rows, K, glu) -> a variant's GemvParams among those within bf16's error: each shape's fastest,
    or (`spec` a comma-separated list of labels) the first label of the list the shape has."""
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    out = {}
    for row in rows:
        timed = {label: t for label, t in row["us"].items() if label not in BASELINES}
        good = [label for label in timed if row["rel_l2"][label] < 2e-2]
        named = [label for label in spec.split(",") if label in good]
        if spec != "fastest" and not named:
            continue
        best = named[0] if named else min(good, key=timed.get)
        out[(row["N"], row["K"], "glu" in row["fused"])] = gemv.GemvParams(**row["params"][best])
        print(f"{row['shape']}: {best} {timed[best]:.2f} us (default {timed['default']:.2f})", flush=True)
    return out


def patch(sets: dict) -> None:
    def default_params(rows, n, k, bits=16, dtype=torch.bfloat16, **kw):
        ours = 1 < rows <= 16 and bits == 16 and kw.get("tma")
        found = sets.get((n, k, kw.get("glu", False))) if ours else None
        return found or LIBRARY(rows, n, k, bits, dtype, **kw)

    gemv.default_params = default_params


def bench(out_dir: str, stem: str, rows: str) -> None:
    app(["bench", "accel", "--model", "qwen3-0.6b", "--batch", "8", "--prompt-tokens", "128",
         "--new-tokens", "256", "--runs", "3", "--time-budget", "120", "--out", out_dir, "--stem", stem,
         "--rows", rows], standalone_mode=False)  # fmt: skip


if __name__ == "__main__":
    ab, out, *specs = sys.argv[1:]
    bench(out, "b8-default", "attnforge,attnforge-torch-projections")
    for spec in specs or ["fastest"]:
        patch(chosen(ab, spec))
        bench(out, "b8-" + spec.replace(",", "+"), "attnforge")
