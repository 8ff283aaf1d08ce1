"""Issue 11 (scratch, for the GPU, kept with its results): where silu(gate) * up is computed in a decode
step's MLP, one row: inside down's read of `[gate | up]` (`gated=True`: every down program recomputes it from
the whole 2I-wide row; 4.6 us of Llama-3-8B's 46.2 us down in `h100/gemv/gemv-sweep-20261206c.json`), or in
the gate/up product's epilogue (`glu=True`: each program owns gate row j and up row I + j and writes
silu * up; down then reads a plain I-wide row).

A: gate/up with its norm, then down gated + residual (the accelerator before `glu`).
B: gate/up with its norm and `glu`, then down + residual (the accelerator since).
Per layer (the two calls) in a CUDA graph of distinct weights, A and B interleaved round by round, each
checked against float64 first, and A against B bit for bit (the same roundings in the same order).

    python benchmarks/results/gpu/gemv/glu_ab.py OUT.json

Ran last at dc4d36c (H100, read-ahead in down): B won on both models (Qwen3-0.6B 10.97 -> 10.60 us, Llama-3-8B
123.9 -> 120.5; `h100/gemv/glu-ab-20261206-dc4d36c.json`), so `gated` was removed from `fused_linear` after
that commit: variant A runs at dc4d36c or earlier only.
"""

import json
import statistics
import sys

import torch
import torch.nn.functional as F

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels.gemv import fused_linear

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gemv_sweep import rms  # noqa: E402

# name: (hidden, intermediate, layers in the graph)
MODELS = {"qwen3-0.6b": (1024, 3072, 28), "llama3-8b": (4096, 14336, 8)}
ROUNDS = 3


def layer_inputs(hidden, inter, layers, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *shape, scale=1.0: torch.randn(*shape, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                                 generator=gen) * scale  # fmt: skip
    x = make(1, hidden)
    gate_up = [make(2 * inter, hidden, scale=hidden**-0.5) for _ in range(layers)]
    down = [make(hidden, inter, scale=inter**-0.5) for _ in range(layers)]
    gain = torch.rand(hidden, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
    return x, gate_up, down, gain


def variant_a(x, wgu, wd, gain):
    return fused_linear(fused_linear(x, wgu, norm=(gain, 1e-6)), wd, gated=True, residual=x)


def variant_b(x, wgu, wd, gain):
    return fused_linear(fused_linear(x, wgu, norm=(gain, 1e-6), glu=True), wd, residual=x)


def reference(x, wgu, wd, gain):
    gate, up = F.linear(rms(x, gain).double(), wgu.double()).chunk(2, dim=-1)
    return x.double() + F.linear(F.silu(gate) * up, wd.double())


def model_row(name, hidden, inter, layers, floor):
    x, wgu, wd, gain = layer_inputs(hidden, inter, layers)
    want = reference(x, wgu[0], wd[0], gain)
    a, b = variant_a(x, wgu[0], wd[0], gain), variant_b(x, wgu[0], wd[0], gain)
    rel = lambda y: float((y.double() - want).norm() / want.norm())  # noqa: E731
    row = {"model": name, "hidden": hidden, "intermediate": inter, "layers_in_graph": layers,
           "rel_l2": {"A": rel(a), "B": rel(b)},
           "a_differs_from_b": float((a != b).float().mean())}  # fmt: skip
    calls = {"A gated down": variant_a, "B glu gate/up": variant_b}
    samples = {c: [] for c in calls}
    for _ in range(ROUNDS):
        for c, fn in calls.items():
            samples[c] += timing.time_graph_per_call(
                lambda i, fn=fn: lambda: fn(x, wgu[i], wd[i], gain), layers=layers, reps=20
            )
    row["us"] = {c: statistics.median(v) for c, v in samples.items()}
    weight_bytes = 3 * inter * hidden * 2
    row["pct_floor"] = {c: 100 * weight_bytes / (t * 1e-6) / floor for c, t in row["us"].items()}
    return row


def main(path):
    doc = {"environment": environment_report(), "read_gbps": timing.measure_read_bandwidth() / 1e9}
    doc["rows"] = []
    for name, (hidden, inter, layers) in MODELS.items():
        row = model_row(name, hidden, inter, layers, doc["read_gbps"] * 1e9)
        doc["rows"].append(row)
        with open(path, "w") as file:
            json.dump(doc, file, indent=1)
        cells = " ".join(f"{c} {t:.2f} us ({row['pct_floor'][c]:.0f}%)" for c, t in row["us"].items())
        differ = row["a_differs_from_b"]
        print(f"{name} MLP: {cells}; rel L2 {row['rel_l2']}, A != B {differ:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
