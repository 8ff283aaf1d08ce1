"""Issue 11 (scratch, for the GPU, kept with its results): one weight slice against several for the products
whose K is over 1024 and whose N is small (Qwen3-0.6B's o and down: 1024 outputs, K 2048 / 3072).

The sweep (`gemv_sweep.py`, H100, `h100/gemv/gemv-sweep-20261206b.json`) put the products with K = 1024 at
72-75% of the read floor and o / down at 32-34%: their later 1024-wide slices are read after the previous
kernel has finished (only the first slice is asked for before the PDL wait), one dependent round trip each,
and with N = 1024 there are only ~2 programs a SM to hide it. Here the fused call the accelerator makes
(o + residual; silu(gate) * up, down, + residual) per call in a CUDA graph of 28 layers on distinct weights,
launch sets interleaved round by round, each checked against float64 first.

    python benchmarks/results/gpu/gemv/slice_ab.py OUT.json
"""

import json
import statistics
import sys

import torch.nn.functional as F

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels.gemv import GemvParams, default_params

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gemv_sweep import inputs, ours_fused, rms  # noqa: E402

SHAPES = {"qwen3-0.6b o": (1024, 2048, "residual"), "qwen3-0.6b down": (1024, 3072, "gated+residual")}
CONFIGS = {"4x1024w4": GemvParams(4, 1024, 4), "8x1024w4": GemvParams(8, 1024, 4),
           "4x2048w4": GemvParams(4, 2048, 4), "4x2048w8": GemvParams(4, 2048, 8),
           "4x4096w4": GemvParams(4, 4096, 4), "4x4096w8": GemvParams(4, 4096, 8),
           "8x2048w8": GemvParams(8, 2048, 8)}  # fmt: skip
LAYERS, ROUNDS = 28, 3


def reference(x, w, g, res, kind):
    """float64 of the fused call (silu(gate) * up and the norm rounded as the model rounds them)."""
    k = w.shape[1]
    xd = (F.silu(x[..., :k]) * x[..., k:]).double() if "gated" in kind else x.double()
    xd = rms(x, g).double() if kind == "norm" else xd
    return F.linear(xd, w.double()) + (res.double() if "residual" in kind else 0)


def shape_row(name, n, k, kind, floor):
    x, ws, g, res = inputs(n, k, kind, 1, LAYERS)
    d = default_params(1, n, k)
    row = {"shape": name, "N": n, "K": k, "default": f"{d.block_n}x{d.block_k}w{d.num_warps}", "rel_l2": {}}
    want = reference(x, ws[0], g, res, kind)
    for c, p in CONFIGS.items():  # correctness first
        got = ours_fused(x, ws[0], g, res, kind, p).double()
        row["rel_l2"][c] = float((got - want).norm() / want.norm())
    calls = {c: (lambda i, p=p: lambda: ours_fused(x, ws[i], g, res, kind, p)) for c, p in CONFIGS.items()}
    calls["cublas+add"] = lambda i: lambda: F.linear(x[..., :k], ws[i]) + res
    samples = {c: [] for c in calls}
    for _ in range(ROUNDS):
        for c, make in calls.items():
            samples[c] += timing.time_graph_per_call(make, layers=LAYERS, reps=20)
    row["us"] = {c: statistics.median(v) for c, v in samples.items()}
    row["pct_floor"] = {c: 100 * n * k * 2 / (t * 1e-6) / floor for c, t in row["us"].items()}
    return row


def main(path):
    doc = {
        "environment": environment_report(),
        "read_gbps": timing.measure_read_bandwidth() / 1e9,
        "rows": [],
    }
    for name, (n, k, kind) in SHAPES.items():
        row = shape_row(name, n, k, kind, doc["read_gbps"] * 1e9)
        doc["rows"].append(row)
        with open(path, "w") as file:
            json.dump(doc, file, indent=1)
        cells = " ".join(f"{c} {t:.2f}" for c, t in row["us"].items())
        worst = max(row["rel_l2"].values())
        print(f"{name}: {cells} us (default {row['default']}; worst rel L2 {worst:.1e})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
