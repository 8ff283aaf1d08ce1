"""Issue 11 (scratch, for the GPU, kept with its results): attnforge's skinny linear (`kernels/gemv.py`)
against torch's `F.linear` (cuBLAS) for the decode step's products, Qwen3-0.6B and Llama-3-8B shapes, 1 and
8 rows.
Run from the repository root with PYTHONPATH=src:

    python gemv_sweep.py OUT.json

1. Correctness (bf16): relative L2 against float64 for every prologue/epilogue, odd sizes included, and the
   share of outputs that differ from torch's own ops (RMSNorm module arithmetic, silu * up, add) in bf16.
2. Per call inside a CUDA graph of one call per layer on distinct weights (what the decode step replays):
   F.linear alone, then each launch configuration of ours on the plain product; the best configuration per
   shape, and it without programmatic dependent launch (`best_no_pdl_us`; before commit b5c9eb9 the kernel
   had no PDL); then the fused call (norm / residual) against torch's unfused ops for the same work.
   Read GB/s and % of the read floor measured in the same run. The fused call also for the fastest plain
   configurations and a few wider ones (`fused_sweep`). JSON rewritten after every row.
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels.gemv import GemvParams, default_params, fused_linear

DEV = "cuda"
# name: (N, K, fused neighbours, layers in the graph)
SHAPES = {
    "qwen3-0.6b qkv": (4096, 1024, "norm", 28),
    "qwen3-0.6b o": (1024, 2048, "residual", 28),
    "qwen3-0.6b gate_up": (6144, 1024, "norm", 28),
    "qwen3-0.6b down": (1024, 3072, "residual", 28),
    "qwen3-0.6b lm_head": (151936, 1024, "norm", 2),
    "llama3-8b qkv": (6144, 4096, "norm", 16),
    "llama3-8b o": (4096, 4096, "residual", 16),
    "llama3-8b gate_up": (28672, 4096, "norm", 8),
    "llama3-8b down": (4096, 14336, "residual", 8),
}
CONFIGS = [GemvParams(n, k, w) for n in (4, 8, 16, 32) for k in (128, 256, 512, 1024) for w in (4, 8)]
# one slice of up to 4096 columns (the default for one row against few outputs since 8bcab9b: slice_ab.py)
CONFIGS += [GemvParams(n, k, w) for n in (4, 8) for k in (2048, 4096) for w in (4, 8)]
# the tensor-core product for several rows (GemvParams.dot; 8 rows: the accelerator's batch 8)
CONFIGS += [
    GemvParams(n, k, w, dot=True, ahead=a)
    for n, k, w in ((16, 256, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8), (16, 512, 4), (16, 1024, 8))
    for a in (False, True)
]
# the next slice's read asked for one loop step ahead (GemvParams.ahead): products of several slices
CONFIGS += [GemvParams(n, k, w, ahead=True) for n, k, w in ((4, 1024, 4), (4, 2048, 8), (8, 1024, 8))]


def rms(x, g, eps=1e-6):
    xf = x.float()
    return g * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_fused(x, w, g, res, kind):
    """torch's own ops for the same work (what the unfused step runs)."""
    if kind == "norm":
        x = rms(x, g)
    y = F.linear(x, w)
    return y + res if "residual" in kind else y


def ours_fused(x, w, g, res, kind, params=None):
    return fused_linear(x, w, norm=(g, 1e-6) if kind == "norm" else None,
                        residual=res if "residual" in kind else None, params=params)  # fmt: skip


def inputs(n, k, kind, rows, layers, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16, generator=gen)
    ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=gen) / k**0.5 for _ in range(layers)]
    g = torch.rand(k, device=DEV, dtype=torch.bfloat16, generator=gen) + 0.5
    res = torch.randn(rows, n, device=DEV, dtype=torch.bfloat16, generator=gen)
    return x, ws, g, res


def check(n, k, kind, rows, params=None):
    x, (w,), g, res = inputs(n, k, kind, rows, 1, seed=1)
    ours = ours_fused(x, w, g, res, kind, params)
    mine = torch_fused(x, w, g, res, kind)
    xd = x.double()
    if kind == "norm":
        xd = rms(x, g).double()
    ref = F.linear(xd, w.double()) + (res.double() if "residual" in kind else 0)
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    differ = (ours != mine).float().mean().item()
    return {"rel_l2": err(ours), "rel_l2_torch": err(mine), "differ_from_torch": differ,
            "finite": bool(torch.isfinite(ours).all())}  # fmt: skip


def per_call(make, layers, reps=40):
    return statistics.median(timing.time_graph_per_call(make, layers=layers, reps=reps))


def shape_rows(name, n, k, kind, layers, rows, floor):
    x, ws, g, res = inputs(n, k, kind, rows, layers)
    wbytes = n * k * 2
    out = {"shape": name, "N": n, "K": k, "rows": rows, "fused": kind, "weight_mb": wbytes / 1e6}
    out["torch_linear_us"] = per_call(lambda i: lambda: F.linear(x[..., :k], ws[i]), layers)
    configs = {}
    for p in CONFIGS:
        if (rows == 1 and p.dot) or (not p.dot and triton_next(rows) * p.block_n * p.block_k > 32768):
            continue
        try:
            configs[name_of(p)] = per_call(
                lambda i, p=p: (lambda: fused_linear(x[..., :k], ws[i], params=p)), layers)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a configuration that fails to compile is skipped
            configs[name_of(p)] = repr(error)[:120]
    timed = {c: t for c, t in configs.items() if isinstance(t, float)}
    best = min(timed, key=timed.get)
    d = default_params(rows, n, k)
    out.update(configs=configs, best=best, best_us=timed[best])
    out["default"] = name_of(d)
    out["default_us"] = timed.get(out["default"])
    bp = next(p for p in CONFIGS if name_of(p) == best)
    nopdl = GemvParams(bp.block_n, bp.block_k, bp.num_warps, pdl=False, dot=bp.dot, ahead=bp.ahead)
    out["best_no_pdl_us"] = per_call(lambda i: lambda: fused_linear(x[..., :k], ws[i], params=nopdl), layers)
    out["torch_fused_us"] = per_call(lambda i: lambda: torch_fused(x, ws[i], g, res, kind), layers)
    out["ours_fused_us"] = per_call(lambda i: lambda: ours_fused(x, ws[i], g, res, kind, bp), layers)
    out["ours_fused_default_us"] = per_call(lambda i: lambda: ours_fused(x, ws[i], g, res, kind), layers)
    out.update(fused_sweep(x, ws, g, res, kind, layers, timed))
    for key in ("torch_linear_us", "best_us", "ours_fused_us"):
        out[key.replace("_us", "_pct_floor")] = 100 * wbytes / (out[key] * 1e-6) / floor
    out["speedup_linear"] = out["torch_linear_us"] / out["best_us"]
    out["speedup_fused"] = out["torch_fused_us"] / out["ours_fused_us"]
    return out


# the fused prologue (RMSNorm's row, silu(gate) * up) is recomputed by every program: wider programs may win
FUSED_EXTRA = ("16x512w4", "16x1024w4", "32x512w4", "32x1024w8", "16x256w4d", "32x256w4d", "32x512w8d",
               "16x256w4da", "32x512w8da", "4x2048w8a")  # fmt: skip


def fused_sweep(x, ws, g, res, kind, layers, timed):
    """The fused call for the six fastest plain configurations and FUSED_EXTRA: {fused_configs, best_fused,
    best_fused_us}."""
    names = sorted(timed, key=timed.get)[:6] + [n for n in FUSED_EXTRA if n in timed]
    fused = {}
    for name in dict.fromkeys(names):
        p = next(c for c in CONFIGS if name_of(c) == name)
        fused[name] = per_call(lambda i, p=p: lambda: ours_fused(x, ws[i], g, res, kind, p), layers)
    best = min(fused, key=fused.get)
    return {"fused_configs": fused, "best_fused": best, "best_fused_us": fused[best]}


def save(doc, path):
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def name_of(p: GemvParams) -> str:
    """'4x1024w4': columns x slice, warps; 'd' for the tensor-core product, 'a' for the slice read ahead."""
    return f"{p.block_n}x{p.block_k}w{p.num_warps}" + ("d" if p.dot else "") + ("a" if p.ahead else "")


def triton_next(v):
    return 1 << (v - 1).bit_length()


def main(path):
    doc = {"environment": environment_report(), "read_gbps": timing.measure_read_bandwidth() / 1e9,
           "checks": [], "rows": []}  # fmt: skip
    floor = doc["read_gbps"] * 1e9
    for name, (n, k, kind, _) in SHAPES.items():
        for rows in (1, 8):
            doc["checks"].append({"shape": name, "rows": rows, **check(n, k, kind, rows)})
        for p in (c for c in CONFIGS if c.dot or c.ahead):  # the newer sets, checked before they are timed
            rows = 8 if p.dot else 1
            doc["checks"].append(
                {"shape": name, "rows": rows, "params": name_of(p), **check(n, k, kind, rows, p)}
            )
    for n, k, kind in ((1000, 1000, "norm"), (37, 200, "residual"), (4099, 72, "residual")):
        doc["checks"].append({"shape": f"odd {n}x{k}", "rows": 3, **check(n, k, kind, 3)})
    save(doc, path)
    for name, (n, k, kind, layers) in SHAPES.items():
        for rows in (1, 8):
            doc["rows"].append(shape_rows(name, n, k, kind, layers, rows, floor))
            save(doc, path)
            r = doc["rows"][-1]
            print(f"{name:20s} r{rows} torch {r['torch_linear_us']:7.2f} ours {r['best_us']:7.2f} "
                  f"({r['best']}, default {r['default_us']}) x{r['speedup_linear']:.2f} | fused torch "
                  f"{r['torch_fused_us']:7.2f} ours {r['ours_fused_us']:7.2f} x{r['speedup_fused']:.2f} | "
                  f"floor% {r['torch_linear_pct_floor']:.0f} / {r['best_pct_floor']:.0f} | best fused "
                  f"{r['best_fused']} {r['best_fused_us']:.2f}",
                  flush=True)  # fmt: skip
    worst = max(doc["checks"], key=lambda c: c["rel_l2"])
    finite = all(c["finite"] for c in doc["checks"])
    print(f"checks: {len(doc['checks'])}, all finite {finite}, worst {worst}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "gemv-sweep.json"))
