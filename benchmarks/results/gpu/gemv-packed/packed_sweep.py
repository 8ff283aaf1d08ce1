"""Issue 15 (scratch, for the GPU): attnforge's skinny linear on weight-only quantized weights
(`kernels/gemv.py` with a `PackedWeight`, the quant backend "triton") against bf16 (cuBLAS and our kernel)
and the torch backend (dequantize, then F.linear), one row, the Llama-3-8B and Qwen3-0.6B decode products.
Run from the repository root with PYTHONPATH=src:

    python benchmarks/results/gpu/gemv-packed/packed_sweep.py OUT.json

1. Correctness: relative L2 against float64 over each packed weight's dequantized values (4/5/8 bits, group
   64), with the norm / glu / residual neighbours; NaN-free.
2. Per call inside a CUDA graph of one call per layer on distinct weights: cuBLAS bf16, ours bf16, ours packed
   at 4/5/8 bits for a few launch configurations, the torch backend; bytes read per call (codes + scales +
   zeros, or the bf16 weight) and their % of the read bandwidth measured in the same run. The issue's rule:
   a library backend is preferred where it reaches 80% of that floor; ours is kept where none does.
JSON rewritten after every row; a short table at the end.
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from attnforge.accel.quant.linear import dequantize_weight, quantize_weight
from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels.gemv import GemvParams, PackedWeight, fused_linear

DEV = "cuda"
GROUP = 64
# name: (N, K, layers in the graph)
SHAPES = {
    "llama3-8b qkv": (6144, 4096, 16),
    "llama3-8b o": (4096, 4096, 16),
    "llama3-8b gate_up": (28672, 4096, 6),
    "llama3-8b down": (4096, 14336, 8),
    "qwen3-0.6b qkv": (4096, 1024, 28),
    "qwen3-0.6b gate_up": (6144, 1024, 28),
}
CONFIGS = [GemvParams(4, 1024, 4), GemvParams(8, 1024, 4), GemvParams(8, 512, 4), GemvParams(16, 512, 8)]


def packed_layers(n, k, bits, layers, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for _ in range(layers):
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=gen) / k**0.5
        codes, scales, zeros = quantize_weight(w, bits, GROUP)
        out.append(PackedWeight(codes, scales, zeros, bits, GROUP))
    return out


def nbytes(packed: PackedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (packed.codes, packed.scales, packed.zeros))


def check(bits):
    """Relative L2 against float64 over the dequantized weight, each neighbour fused."""
    n, k = 1000, 1024
    (packed,) = packed_layers(n, k, bits, 1, seed=bits)
    dense = dequantize_weight(packed.codes, packed.scales, packed.zeros, bits, GROUP, k).double()
    gen = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(1, 2 * k, device=DEV, dtype=torch.bfloat16, generator=gen)
    gain = torch.rand(k, device=DEV, dtype=torch.bfloat16, generator=gen) + 0.5
    res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16, generator=gen)
    xs = x[:, :k]  # n = 1000 outputs, or 500 of silu(gate) * up
    normed = gain * (xs.float() * torch.rsqrt(xs.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    gate, up = F.linear(xs.double(), dense).chunk(2, dim=-1)
    cases = {
        "plain": (fused_linear(xs, packed), F.linear(xs.double(), dense)),
        "norm": (fused_linear(xs, packed, norm=(gain, 1e-6)), F.linear(normed.double(), dense)),
        "residual": (fused_linear(xs, packed, residual=res), res.double() + F.linear(xs.double(), dense)),
        "glu": (fused_linear(xs, packed, glu=True), F.silu(gate) * up),
    }  # fmt: skip
    return {name: {"rel_l2": ((y.double() - ref).norm() / ref.norm()).item(),
                   "finite": bool(y.isfinite().all())} for name, (y, ref) in cases.items()}  # fmt: skip


def per_call(make, layers, reps=40):
    return statistics.median(timing.time_graph_per_call(make, layers=layers, reps=reps))


def time_bf16(row, x, n, k, layers):
    gen = torch.Generator(device=DEV).manual_seed(3)
    dense = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=gen) / k**0.5
             for _ in range(layers)]  # fmt: skip
    row["cublas_bf16_us"] = per_call(lambda i: lambda: F.linear(x, dense[i]), layers)
    row["ours_bf16_us"] = per_call(lambda i: lambda: fused_linear(x, dense[i]), layers)


def time_packed(row, x, n, k, bits, layers, floor):
    packed = packed_layers(n, k, bits, layers, seed=bits)
    row[f"{bits}bit_mb"] = nbytes(packed[0]) / 1e6
    configs = {}
    for p in CONFIGS:
        label = f"{p.block_n}x{p.block_k}w{p.num_warps}"
        try:
            configs[label] = per_call(lambda i, p=p: lambda: fused_linear(x, packed[i], params=p), layers)
        except Exception as error:  # noqa: BLE001 - a configuration that fails to compile is reported
            configs[label] = repr(error)[:120]
    timed = {c: t for c, t in configs.items() if isinstance(t, float)}
    best = min(timed, key=timed.get)
    row[f"{bits}bit_configs"], row[f"{bits}bit_best"], row[f"{bits}bit_us"] = configs, best, timed[best]
    row[f"{bits}bit_default_us"] = per_call(lambda i: lambda: fused_linear(x, packed[i]), layers)
    row[f"{bits}bit_pct_floor"] = 100 * nbytes(packed[0]) / (timed[best] * 1e-6) / floor
    row[f"{bits}bit_vs_cublas_bf16"] = row["cublas_bf16_us"] / timed[best]
    if bits == 4:  # the torch backend: dequantize the whole weight per call, then F.linear

        def torch_backend(i):
            weight = packed[i]
            return lambda: F.linear(
                x, dequantize_weight(weight.codes, weight.scales, weight.zeros, 4, GROUP, k)
            )

        row["torch_backend_4bit_us"] = per_call(torch_backend, layers)


def shape_row(name, n, k, layers, floor):
    x = torch.randn(
        1, k, device=DEV, dtype=torch.bfloat16, generator=torch.Generator(device=DEV).manual_seed(2)
    )
    row = {"shape": name, "N": n, "K": k, "bf16_mb": n * k * 2 / 1e6}
    time_bf16(row, x, n, k, layers)
    for bits in (4, 5, 8):
        time_packed(row, x, n, k, bits, layers, floor)
    row["cublas_bf16_pct_floor"] = 100 * n * k * 2 / (row["cublas_bf16_us"] * 1e-6) / floor
    return row


def main(path):
    doc = {"environment": environment_report(), "read_gbps": timing.measure_read_bandwidth() / 1e9,
           "group_size": GROUP, "checks": {bits: check(bits) for bits in (4, 5, 8)}, "rows": []}  # fmt: skip
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    for name, (n, k, layers) in SHAPES.items():
        doc["rows"].append(shape_row(name, n, k, layers, doc["read_gbps"] * 1e9))
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        r = doc["rows"][-1]
        cells = " ".join(f"{b}bit {r[f'{b}bit_us']:.1f} ({r[f'{b}bit_pct_floor']:.0f}%)" for b in (4, 5, 8))
        bf16 = f"cuBLAS bf16 {r['cublas_bf16_us']:.1f} ({r['cublas_bf16_pct_floor']:.0f}%)"
        print(f"{name:20s} {bf16} ours bf16 {r['ours_bf16_us']:.1f} | {cells} | torch backend 4bit "
              f"{r['torch_backend_4bit_us']:.1f} us", flush=True)  # fmt: skip
    print(json.dumps(doc["checks"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "packed-sweep.json"))
