"""Issue 11 (A/B): the library's swapped product at 8 rows on the GEMV sweep's Qwen3-0.6B and Llama-3-8B
products (neighbours fused as the accelerator calls them), launched as by default and as it might be: each
split's first weight slice read before the PDL wait (`GemvParams.early`; the residual then read right after
it), each program's whole share asked of the L2 before the wait (`GemvParams.prefetch`: one bulk prefetch a
weight row), both; on Qwen3-0.6B's layers also early with twice the split (each program's share of K read
sooner), early with a stage fewer, and narrow tiles of 32 or 16 weight rows (mma.sync rather than wgmma: two
to four times the programs, so less K split or none; early).
First against float64 (every variant), then per call in graphs of one call a layer on distinct weights, all
variants of a shape replayed in turn (`timing.time_graphs_per_call`), with cuBLAS alone and cuBLAS + torch's
ops as baselines. The LM heads too (Qwen3-0.6B's, Llama-3-8B's), whose default is the dot set: also swapped.

    PYTHONPATH=src:<wheels> python swap_ab.py OUT.json [ONLY]  # from this directory (about 4 minutes; ONLY:
                                                               # the shapes whose name has it, e.g. qwen3)

The weights never depend on the kernel before, so the read may start under its tail (the one-row kernel
does it with its first slice); the swapped kernel read nothing before the wait (h200/accel-b8-swap-*/:
its four products 23.9 us a layer at batch 8, against 16 at one row on an H100). Its wide tiles leave
Qwen3-0.6B's gate/up 48 programs on 132 SMs (64 outputs a tile, K whole: 9.04 us on the H100, 2.2x its
read floor); 32-row tiles make 96 (offline on sm_90 they compile to HMMA without spills:
`cpu/gemv-swap/narrow-20261207.txt`).
"""

import dataclasses
import json
import statistics
import sys

import probe
import torch
import torch.nn.functional as F

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import gemv
from attnforge.kernels.tuning import sm_count

ROWS = 8


# The LM heads (more than SWAP_MAX_N rows: the dot set by default; Qwen3-0.6B's took 111 us a batch-8 step on
# the H200 against a 72 us read floor), also timed through the swapped product's set for their shape
LM_HEAD = {"qwen3-0.6b lm_head": probe.gemv_sweep.SHAPES["qwen3-0.6b lm_head"],
           "llama3-8b lm_head": (128256, 4096, "norm", 2)}  # fmt: skip


# narrow tiles (block_n, block_k, warps, stages), each early with K split to fill a wave of SMs
# (512-wide slices take 255 registers and spill in gate/up offline: not among them)
NARROW = {"n32x256": (32, 256, 4, 4), "n32x128": (32, 128, 4, 6), "n16x256": (16, 256, 4, 4)}


def variants(n: int, k: int, glu: bool, norm: bool, every: bool, sms: int) -> dict:
    """label -> GemvParams for a weight of n rows: the default, early, prefetch (each program's share asked
    of the L2 before the wait), both; with `every` (Qwen3-0.6B's layers) also early with twice the split,
    early with a stage fewer (early's first slice has a buffer of its own: o and down take 164 KB of shared
    memory early, 123 KB without, offline) and each narrow tile; and, where it differs, the default with no
    more stages than its loop has slices (`st-fit`), and for Qwen3-0.6B's gate/up the same with twice the
    split (`2x-split-st-fit`: 74 KB of shared memory a program instead of 222); and where the default splits
    K, `narrow-merge` (`GemvParams.narrow_merge`: the last program sums the 8 real rows of the partials only,
    as a tree; twenty-third session, offline `cpu/gemv-swap/merge-tail-20261208.txt`); where it fuses the
    norm, `rms-1024` (`GemvParams.rms_block`: the norm's pass over the rows in 1024-wide slices,
    `cpu/gemv-swap/rms-prologue-20261208.txt`)."""
    outputs = n // 2 if glu else n
    default = gemv.default_params(ROWS, n, k, glu=glu, norm=norm, tma=True, sms=sms)
    out = {"default": default}
    swap = default if default.swap else gemv._swap_params(outputs, k, glu, norm, sms)
    if not default.swap:
        out["swap"] = swap
    out["early"] = dataclasses.replace(swap, early=True)
    out["prefetch"] = dataclasses.replace(swap, prefetch=True)
    out["early-prefetch"] = dataclasses.replace(swap, early=True, prefetch=True)
    if every:
        out["early-2x-split"] = dataclasses.replace(swap, early=True, split_k=2 * swap.split_k)
        out["early-st-1"] = dataclasses.replace(swap, early=True, num_stages=max(2, swap.num_stages - 1))
    for name, (block_n, block_k, warps, stages) in NARROW.items() if every else ():
        out[name] = gemv.GemvParams(block_n, block_k, warps, swap=True, split_k=gemv.wave_split(outputs,
                                    block_n, sms), num_stages=stages, early=True)  # fmt: skip
    if default.swap and gemv.swap_split(k, default.block_k, default.split_k)[1] > 1:
        out["narrow-merge"] = dataclasses.replace(default, narrow_merge=True)  # the 8 real rows' sum, a tree
    if default.swap and norm and k >= 1024:  # the norm's pass in 1024-wide slices (1-4 round trips, not 2-8)
        out["rms-1024"] = dataclasses.replace(default, rms_block=1024)
        if "narrow-merge" in out:
            out["narrow-merge-rms-1024"] = dataclasses.replace(default, narrow_merge=True, rms_block=1024)
    fit = fitted_stages(default, k)
    if default.swap and fit != default.num_stages:
        out["st-fit"] = dataclasses.replace(default, num_stages=fit)
    if every and glu and default.swap:  # its glu set: 222 KB a program, 74 like this
        wide = dataclasses.replace(default, split_k=2 * default.split_k)
        out["2x-split-st-fit"] = dataclasses.replace(wide, num_stages=fitted_stages(wide, k))
    return out


def fitted_stages(p, k: int) -> int:
    """The swapped launch `p`'s stages cut to the slices its loop reads (a split's slices, less early's
    first): buffers no slice fills still take shared memory, which keeps the next kernel's programs off the
    SM (Qwen3-0.6B's o and down at 8 rows read one slice after early's, or none: 164 KB with 3 stages, 41 KB
    with 1, offline on sm_90:
    `cpu/gemv-swap/step-shared-20261207.txt`)."""
    slices = gemv.swap_split(k, p.block_k, p.split_k)[0] // p.block_k - (1 if p.early else 0)
    return max(1, min(p.num_stages, slices))


def shape_row(name, n, k, kind, layers, read_gbps) -> dict:
    x, ws, g, res = probe.inputs(n, k, ROWS, layers)
    norm, residual = probe.neighbours(kind, g, res, n)
    glu = "glu" in kind
    ref = probe.reference(x, ws[0], g, res, kind, n)
    row = {"shape": name, "N": n, "K": k, "rows": ROWS, "fused": kind,
           "floor_us": n * k * 2 / (read_gbps * 1e3), "params": {}, "rel_l2": {}}  # fmt: skip
    makers = {"cublas": lambda i: lambda: F.linear(x, ws[i])}

    def torch_ops(w):
        y = F.linear(probe.rms(x, g) if norm is not None else x, w)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y + residual if residual is not None else y

    makers["torch_ops"] = lambda i: lambda: torch_ops(ws[i])
    every = name.startswith("qwen3") and "lm_head" not in name
    for label, p in variants(n, k, glu, norm is not None, every, sm_count("cuda")).items():
        call = lambda w, p=p: gemv.fused_linear(x, w, norm=None if norm is None else (g, 1e-6),  # noqa: E731
                                                residual=residual, glu=glu, params=p)  # fmt: skip
        y = call(ws[0])
        row["rel_l2"][label] = ((y.double() - ref).norm() / ref.norm()).item()
        row["params"][label] = dataclasses.asdict(p)
        makers[label] = lambda i, call=call: lambda: call(ws[i])
    times = timing.time_graphs_per_call(makers, layers=layers, reps=30)
    row["us"] = {label: statistics.median(t) if isinstance(t, list) else t for label, t in times.items()}
    return row


def main(path: str, only: str = "") -> None:
    read_gbps = timing.measure_read_bandwidth() / 1e9
    doc = {"environment": environment_report(), "read_gbps": read_gbps, "rows": []}
    for name, (n, k, kind, layers) in (probe.SHAPES | LM_HEAD).items():
        if only not in name:
            continue
        row = shape_row(name, n, k, kind, layers, read_gbps)
        doc["rows"].append(row)
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
        ok = all(err < 2e-2 for err in row["rel_l2"].values())
        us = " ".join(f"{label} {t:6.2f}" for label, t in row["us"].items() if isinstance(t, float))
        print(f"{name:18s} {'ok' if ok else 'WRONG'} floor {row['floor_us']:6.2f} {us}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:3])
