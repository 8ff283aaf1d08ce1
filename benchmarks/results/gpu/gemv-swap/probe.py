"""Issue 11 (scratch): a skinny linear for a few rows with the weight as the tensor cores' big operand (the
kernel this probe held at 16edd12, where it ran on an H100, is the library's `gemv._swap_kernel` since
7569ceb; the probe now times the library's launch sets).

`fused_linear`'s tensor-core sets (`GemvParams.dot`) multiply the rows (padded to 16) by the weight's slice:
M = 16 rows, which Hopper's wgmma cannot take (its M is 64), so Triton runs them through mma.sync with the
slice moved to its operand layout. Here the product is turned around, `y^T = W x^T`: the weight tile
`[BLOCK_N >= 64, BLOCK_K]` is wgmma's A operand straight from shared memory (through TMA, or pointers), the
rows `x^T` `[BLOCK_K, 16]` its B, and the accumulator `[BLOCK_N, 16]` is small. Few outputs (Qwen3-0.6B's o
and down, N = 1024: 16 tiles of 64) leave most SMs idle, so the K range is split (`split_k` programs a tile
of outputs, each over K / split_k features): fp32 partials in a workspace, merged in split order by the
program that arrives last (a counter a tile, reset by it), then the epilogue. The RMSNorm prologue (each
program reads x's rows whole for their mean) and the residual epilogue are the library's, same rounding.

    python probe.py check            # against float64, odd sizes and 1..8 rows, every launch set below
    python probe.py time OUT.json    # per call in graphs of one call a layer on distinct weights (as the
                                     # GEMV sweep): cuBLAS, torch's ops, fused_linear's default, each set

Batch-8 decode through the dot sets ran 0.94x the cuBLAS step (h100/accel-b8-dot-20261207-4f98fd8/); the
batch-8 target (5x transformers' best) needs eight-row products near one-row speed.
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import gemv
from attnforge.kernels.gemv import GemvParams, fused_linear
from attnforge.kernels.tma import tma_capable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemv"))
import gemv_sweep  # noqa: E402  (its shapes)


class SwapLinear:
    """`residual + linear(norm(x), w)` (glu: silu(gate) * up) for x `[rows <= 16, K]`, w `[N, K]`, through
    the library's swapped product (`gemv._swap_kernel`, in the library since 7569ceb; at 16edd12 this probe
    held the kernel) with one launch set: output tile, slice, warps, stages, split of K."""

    def __init__(self, n, k, block_n=64, block_k=128, warps=4, stages=3, split_k=1, device="cuda", glu=False):
        self.n, self.k, self.glu = n, k, glu  # n: outputs (the weight has 2n rows with glu)
        self.split_k = gemv.swap_split(k, block_k, split_k)[1]  # as the launch counts them
        self.tma = tma_capable(torch.device(device), torch.bfloat16)
        self.params = GemvParams(block_n, block_k, warps, swap=True, split_k=split_k, num_stages=stages)

    @property
    def name(self) -> str:
        p = self.params
        return (f"{p.block_n}x{p.block_k}w{p.num_warps}st{p.num_stages}k{self.split_k}"
                + ("-tma" if self.tma else "") + ("-glu" if self.glu else ""))  # fmt: skip

    def __call__(self, x, w, gain=None, eps=1e-6, residual=None):
        norm = None if gain is None else (gain, eps)
        return fused_linear(x, w, norm=norm, residual=residual, glu=self.glu, params=self.params)


# the GEMV sweep's shapes but the LM heads: name -> (weight rows N, K, fused neighbours, layers in the graph),
# gate/up fused as the accelerator calls it ("glu": [gate; up], silu(gate) * up out)
SHAPES = {name: (n, k, "norm+glu" if "gate_up" in name else kind, layers)
          for name, (n, k, kind, layers) in gemv_sweep.SHAPES.items() if "lm_head" not in name}  # fmt: skip
# (block_n, block_k, warps, stages): 64/128 outputs (wgmma's M), 128/256-wide slices
SETS = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 4, 3), (128, 128, 8, 4)]


def launches(n, k, kind, device="cuda"):
    """The launch sets timed for one shape (`n` weight rows): each set with K split so the grid covers ~1-2
    waves of SMs. The weight through TMA where the GPU has it (through pointers its tile passes through
    registers: 247-255 a thread, spills at 128 x 256; `cpu/gemv-swap/compile-swap-20261207.txt`), else
    pointers (the interpreter)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 4
    glu = "glu" in kind
    outputs = n // 2 if glu else n
    out = []
    for block_n, block_k, warps, stages in SETS:
        if glu:  # two tiles a stage, within Hopper's 227 KB of shared memory (with the epilogue's)
            stages = min(stages, 200 * 1024 // (2 * block_n * block_k * 2))
            if stages < 2:
                continue
        tiles = triton.cdiv(outputs, block_n)
        for split in dict.fromkeys((1, max(1, sms // tiles), max(1, 2 * sms // tiles))):
            out.append(SwapLinear(outputs, k, block_n, block_k, warps, stages, split, device, glu))
    return {launch.name: launch for launch in out}


def rms(x, g, eps=1e-6):
    xf = x.float()
    return g * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def inputs(n, k, rows, layers, device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    ws = [make(n, k) / k**0.5 for _ in range(layers)]
    return make(rows, k), ws, torch.rand(k, device=device, generator=gen).add(0.5).bfloat16(), make(rows, n)


def neighbours(kind, g, res, n):
    """(norm gain, residual) of a shape's fused work (`res` cut to the outputs: n / 2 with glu)."""
    return (g if "norm" in kind else None), (res[:, : n // 2 if "glu" in kind else n] if "residual" in kind
                                             else None)  # fmt: skip


def reference(x, w, g, res, kind, n):
    """The fused work in float64."""
    norm, residual = neighbours(kind, g, res, n)
    y = F.linear((rms(x, g) if norm is not None else x).double(), w.double())
    if "glu" in kind:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y + (residual.double() if residual is not None else 0)


def error(launch, n, k, rows, kind, device):
    x, (w,), g, res = inputs(n, k, rows, 1, device, seed=n + k + rows)
    norm, residual = neighbours(kind, g, res, n)
    ref = reference(x, w, g, res, kind, n)
    errors = []
    for _ in range(2):  # twice: the counters come back to zero
        y = launch(x, w, norm, 1e-6, residual)
        errors.append(((y.double() - ref).norm() / ref.norm()).item() if torch.isfinite(y).all() else 1.0)
    return max(errors), all(not counters.any() for _, counters in gemv._WORKSPACES.values())


def check(device="cuda") -> bool:
    ok = True
    cases = [(4096, 1024, "norm"), (1024, 3072, "residual"), (6144, 1024, "norm+glu"), (1000, 1000, "norm"),
             (37, 200, "residual"), (4099, 72, "residual"), (74, 72, "norm+glu")]  # fmt: skip
    for n, k, kind in cases:
        for rows in (1, 3, 8):
            for name, launch in launches(n, k, kind, device).items():
                err, reset = error(launch, n, k, rows, kind, device)
                # bf16's tolerance; the interpreter truncates at each of glu's five roundings: twice it
                good = err < (4e-2 if "glu" in kind and device == "cpu" else 2e-2) and reset
                ok &= good
                if not good:
                    print(f"FAILED {n}x{k} {kind} rows {rows} {name}: rel L2 {err:.2e}, reset {reset}")
        print(f"{n}x{k} {kind}: checked", flush=True)
    print("check", "ok" if ok else "FAILED")
    return ok


def per_call(make, layers, reps=40):
    return statistics.median(timing.time_graph_per_call(make, layers=layers, reps=reps))


def time_shape(name, n, k, kind, layers, rows, read_gbps) -> dict:
    """One shape at `rows` rows: cuBLAS alone, torch's ops for the fused work, fused_linear's default, each
    swapped launch set (the fused work), per call in a graph of `layers` calls on distinct weights."""
    x, ws, g, res = inputs(n, k, rows, layers)
    norm, residual = neighbours(kind, g, res, n)
    glu = "glu" in kind

    def torch_ops(w):
        y = F.linear(rms(x, g) if norm is not None else x, w)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y + residual if residual is not None else y

    def library(w):
        return fused_linear(x, w, norm=None if norm is None else (g, 1e-6), residual=residual, glu=glu)

    row = {"shape": name, "N": n, "K": k, "rows": rows, "fused": kind,
           "floor_us": n * k * 2 / (read_gbps * 1e3),
           "cublas_us": per_call(lambda i: lambda: F.linear(x, ws[i]), layers),
           "torch_fused_us": per_call(lambda i: lambda: torch_ops(ws[i]), layers),
           "fused_linear_us": per_call(lambda i: lambda: library(ws[i]), layers), "swap_us": {}}  # fmt: skip
    for label, launch in launches(n, k, kind).items():
        call = lambda i, f=launch: lambda: f(x, ws[i], norm, 1e-6, residual)  # noqa: E731
        row["swap_us"][label] = per_call(call, layers)
    row["best"] = min(row["swap_us"], key=row["swap_us"].get)
    row["best_us"] = row["swap_us"][row["best"]]
    return row


def time(path):
    read_gbps = timing.measure_read_bandwidth() / 1e9
    doc = {"environment": environment_report(), "read_gbps": read_gbps, "rows": []}
    for name, (n, k, kind, layers) in SHAPES.items():
        for rows in (1, 8):
            row = time_shape(name, n, k, kind, layers, rows, read_gbps)
            doc["rows"].append(row)
            with open(path, "w") as fh:
                json.dump(doc, fh, indent=1)
            print(f"{name:18s} r{rows} floor {row['floor_us']:6.2f} cuBLAS {row['cublas_us']:6.2f} torch ops "
                  f"{row['torch_fused_us']:6.2f} fused_linear {row['fused_linear_us']:6.2f} swap "
                  f"{row['best_us']:6.2f} ({row['best']})", flush=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    time(sys.argv[2])
