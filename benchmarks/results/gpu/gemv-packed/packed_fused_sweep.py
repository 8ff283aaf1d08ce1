"""Issue 15 (scratch, for the GPU): launch sets for the packed skinny linear in the forms the accelerator
calls (Llama-3-8B, one row): q/k/v with its RMSNorm, o with the residual, gate/up with its norm and silu * up
(`glu`), down with the residual; 8-bit (quality-8bit, target 1.4x bf16) and 5-bit codes, group 64, and the
bf16 weights as stored (the unquantized accelerator's calls), each against an earlier kernel at its default
where a copy of it sits beside this file as `gemv_before.py` (make it with `git show
<commit>:src/attnforge/kernels/gemv.py`, its `_linear_op` registration and the op's fake removed and
`fused_linear` eager only: the eighth session compared f637038's; the 4/5-bit words path is compared with
28ea064's). Run from the repository root with PYTHONPATH=src (SWEEP_BITS=8,16,5 by default):

    python benchmarks/results/gpu/gemv-packed/packed_fused_sweep.py OUT.json

Each set is checked against the float64 product over the dequantized weight (relative L2), then timed per
call in a CUDA graph of one call per layer on distinct weights; % of the read bandwidth measured in the same
run. JSON rewritten after every row; a short table at the end. Unfused references per 8-bit shape: cuBLAS
bf16 and core torch's int8 weight-only product. What it found (H100): at 7a4b8b9 against the kernel before
(`packed-fused-sweep-20261206-7a4b8b9.json`: the slice carried as read is 1.1-1.4x faster; 8 x 1024 with
read-ahead the fastest 8-bit set on all four products, 54-62% of the read floor); at 20542e6 codes read as
32-bit words (`packed-fused-sweep-20261206-20542e6.json`: slower than bytes on q/k/v and o, at most 9%
faster on down, though 28% fewer instructions a loop step offline, cpu/gemv-packed/sass-loop-20261206c.txt;
dropped) and the 5-bit sets; at 3355df7-28ea064 the codes read as int32 words in x's layout, one `prmt` a
code (`...-{3355df7,972ecc4,28ea064}.json`: 8-bit 1.3-1.5x faster than f637038's kernel at 28ea064's
launches, 70-88% of the floor; bf16 0.5-8% faster, 89-99%; 5-bit equal once it kept its group-wide sums);
at 548b9c4 the 4/5-bit codes read as int32 words of eight nibbles against 28ea064's kernel
(`...-548b9c4.json`: 5-bit 4 x 1024 0.99-1.11x, 8 x 1024 1.06-1.38x the kernel before on the four products:
the new default; 8-bit equal to before).
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
from attnforge.kernels.gemv import GemvParams, PackedWeight, default_params, fused_linear

sys.path.insert(0, os.path.dirname(__file__))
try:  # an earlier kernel, timed beside this one where its copy is here (see above)
    import gemv_before as before  # noqa: E402
except ImportError:
    before = None

DEV = "cuda"
GROUP = 64
EPS = 1e-5
# name: (N of the weight, K, layers in the graph, form)
SHAPES = {
    "qkv+norm": (6144, 4096, 16, "norm"),
    "o+residual": (4096, 4096, 16, "residual"),
    "gate_up+norm+glu": (28672, 4096, 6, "glu"),
    "down+residual": (4096, 14336, 8, "residual"),
}
SETS = {  # bits: (block_n, block_k, warps, ahead); the first is `default_params`' choice
    8: [
        (8, 1024, 4, True),
        (8, 2048, 4, True),
        (4, 1024, 4, True),
        (16, 1024, 4, True),
        (8, 2048, 8, True),
        (16, 2048, 8, True),
        (8, 1024, 4, False),
        (8, 512, 2, True),
        (4, 512, 2, True),
    ],
    16: [(4, 2048, 8, True), (8, 2048, 8, True), (4, 1024, 4, True), (8, 1024, 4, True), (2, 2048, 8, True)],
    5: [(8, 1024, 4, True), (4, 1024, 4, True), (16, 1024, 4, True), (2, 1024, 2, True)],
}
# the earlier kernel's launch per bits (f637038's defaults; 16: the weight as stored, the unquantized step's)
BEFORE = {8: (8, 1024, 4, True), 16: (4, 2048, 8, True), 5: (4, 1024, 4, True)}


def packed_layers(n, k, bits, layers, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for _ in range(layers):
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=gen) / k**0.5
        out.append(w if bits == 16 else PackedWeight(*quantize_weight(w, bits, GROUP), bits, GROUP))
    return out


def nbytes(packed) -> int:
    if isinstance(packed, torch.Tensor):
        return packed.numel() * packed.element_size()
    return sum(t.numel() * t.element_size() for t in (packed.codes, packed.scales, packed.zeros))


def call_for(form, x, packed, gain, res, params, linear=fused_linear):
    if form == "norm":
        return lambda: linear(x, packed, norm=(gain, EPS), params=params)
    if form == "glu":
        return lambda: linear(x, packed, norm=(gain, EPS), glu=True, params=params)
    return lambda: linear(x, packed, residual=res, params=params)


def expected(form, x, packed, gain, res):
    k = x.shape[-1]
    if isinstance(packed, torch.Tensor):
        dense = packed.double()
    else:
        dense = dequantize_weight(packed.codes, packed.scales, packed.zeros, packed.bits, GROUP, k).double()
    xin = x
    if form in ("norm", "glu"):
        xin = gain * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    y = F.linear(xin.double(), dense)
    if form == "glu":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y + res.double() if form == "residual" else y


def shape_row(name, n, k, layers, form, bits, floor, sets):
    gen = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16, generator=gen)
    gain = torch.rand(k, device=DEV, dtype=torch.bfloat16, generator=gen) + 0.5
    out_n = n // 2 if form == "glu" else n
    res = torch.randn(1, out_n, device=DEV, dtype=torch.bfloat16, generator=gen)
    packed = packed_layers(n, k, bits, layers, seed=bits)
    ref = expected(form, x, packed[0], gain, res)
    default = default_params(1, n, k, bits)
    row = {
        "shape": name,
        "bits": bits,
        "N": n,
        "K": k,
        "mb": nbytes(packed[0]) / 1e6,
        "sets": {},
        "default": f"{default.block_n}x{default.block_k}w{default.num_warps}{'a' if default.ahead else ''}",
    }
    runs = [(s, fused_linear, GemvParams, "") for s in sets]
    if before is not None:
        runs.append((BEFORE[bits], before.fused_linear, before.GemvParams, "before "))
    for (bn, bk, warps, ahead), linear, params_type, tag in runs:
        label = f"{tag}{bn}x{bk}w{warps}{'a' if ahead else ''}"
        p = params_type(bn, bk, warps, ahead=ahead)
        if tag and not isinstance(packed[0], torch.Tensor):  # the kernel before takes its own PackedWeight
            packed = [before.PackedWeight(w.codes, w.scales, w.zeros, w.bits, w.group_size) for w in packed]
        try:
            y = call_for(form, x, packed[0], gain, res, p, linear)()
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            if not (rel < 2e-2 and y.isfinite().all()):
                row["sets"][label] = f"incorrect (rel L2 {rel:.2e})"
                continue
            us = statistics.median(
                timing.time_graph_per_call(
                    lambda i, p=p, linear=linear, packed=packed: call_for(
                        form, x, packed[i], gain, res, p, linear
                    ),
                    layers=layers,
                    reps=40,
                )
            )
            row["sets"][label] = {
                "us": us,
                "rel_l2": rel,
                "pct_floor": 100 * row["mb"] * 1e6 / (us * 1e-6) / floor,
            }
        except Exception as error:  # noqa: BLE001 - a set that fails to compile or launch is reported
            row["sets"][label] = repr(error)[:160]
    if bits == 8:
        row["plain_products"] = plain_products(x, n, k, layers, floor)
    return row


def plain_products(x, n, k, layers, floor):
    """Unfused references for the same weight shape: cuBLAS bf16, and core torch's int8 weight-only product
    (`torch._weight_int8pack_mm`: per-output-channel scales, no groups), per call in the same graphs."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    dense = [
        torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=gen) / k**0.5 for _ in range(layers)
    ]
    codes = [
        torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8, generator=gen) for _ in range(layers)
    ]
    scales = [torch.rand(n, device=DEV, dtype=torch.bfloat16, generator=gen) / 127 for _ in range(layers)]
    cells = {
        "cublas_bf16": (lambda i: lambda: F.linear(x, dense[i]), n * k * 2),
        "torch_int8pack": (
            lambda i: lambda: torch._weight_int8pack_mm(x, codes[i], scales[i]),
            n * k + 2 * n,
        ),
    }
    out = {}
    for name, (make, nbytes) in cells.items():
        try:
            us = statistics.median(timing.time_graph_per_call(make, layers=layers, reps=40))
            out[name] = {"us": us, "pct_floor": 100 * nbytes / (us * 1e-6) / floor}
        except Exception as error:  # noqa: BLE001 - a path this torch does not run on this GPU is reported
            out[name] = repr(error)[:160]
    ref = (x.double() @ codes[0].double().T) * scales[0].double()
    got = torch._weight_int8pack_mm(x, codes[0], scales[0]).double()
    out["torch_int8pack_rel_l2"] = ((got - ref).norm() / ref.norm()).item()
    return out


def main(path):
    doc = {"environment": environment_report(), "read_gbps": timing.measure_read_bandwidth() / 1e9,
           "group_size": GROUP, "rows": []}  # fmt: skip
    floor = doc["read_gbps"] * 1e9
    for bits in [int(b) for b in os.environ.get("SWEEP_BITS", "8,16,5").split(",")]:
        for name, (n, k, layers, form) in SHAPES.items():
            row = shape_row(name, n, k, layers, form, bits, floor, SETS[bits])
            doc["rows"].append(row)
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
            timed = {s: c["us"] for s, c in row["sets"].items() if isinstance(c, dict)}
            if not timed:
                print(f"{bits}bit {name}: no set timed", flush=True)
                continue
            best = min(timed, key=timed.get)
            cells = " ".join(f"{s} {t:.1f}" for s, t in timed.items())
            default_us = timed.get(row["default"], float("nan"))
            pct = row["sets"][best]["pct_floor"]
            print(f"   unfused: {row.get('plain_products')}", flush=True)
            print(f"{bits}bit {name:18s} default {row['default']} {default_us:.1f} | best {best} "
                  f"{timed[best]:.1f} ({pct:.0f}%) | {cells}", flush=True)  # fmt: skip
    bad = [(r["shape"], r["bits"], s, c) for r in doc["rows"] for s, c in r["sets"].items()
           if not isinstance(c, dict)]  # fmt: skip
    print("not timed:", bad)


if __name__ == "__main__":
    main(
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.join(os.environ.get("OUT", "."), "packed-fused-sweep.json")
    )
