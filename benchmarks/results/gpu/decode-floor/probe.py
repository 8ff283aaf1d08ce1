"""Issue 10 probe (scratch): how fast can any one kernel read a B1 decode call's keys and values? The floor
that 1.2x at 16k keys is measured against.

The library's decode launch reaches 69-72% of the read floor at 16k keys (30.4 us for 32:8 against torch's
33.6 plain; 1.2x needs 28.0) and 91-94% at 64k: a fixed cost of 7-8 us a call that torch's kernel pays too
(in 28-call graphs both take ~29 us at 16k). This probe times, in one process and interleaved (plain: CUDA
events after an L2 flush; graphs: 28 calls on distinct buffers), on the same K/V:
  - `sdpa`: torch SDPA with enable_gqa; `library`: `decode_attention` (the tuning table's launch);
  - `split-sS-nN-stT`: the library's grid and read pattern (S splits of the keys a KV head, N-key tiles, T
    stages) with attention's two products and no softmax, partials, or merge: its structure's floor;
  - `flat-pP`: P programs each reading an equal contiguous share of K then V with 16-byte loads, 8 in flight
    a thread: the floor of any one-kernel read of these bytes;
  - `torch-sum`: torch's reduction over the same bytes (K and V in one tensor).
Every read is checked against torch in float64 before timing (a probe that reads less would look fast).

    PYTHONPATH=src python3 probe.py time OUT.json    (GPU; about 2 minutes)
"""

import json
import sys

import torch
import triton
import triton.language as tl

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import decode

HQ, HKV, D = 32, 8, 128
LENGTHS = (1024, 4096, 16384, 65536)
SPLIT_SETS = ((16, 128, 3), (16, 128, 4), (16, 64, 4), (16, 64, 6), (32, 64, 3), (32, 128, 2), (8, 128, 4))
FLAT_PROGRAMS = (132, 264, 528, 1056)
FLAT_VEC = 8  # bf16 a 16-byte load
FLAT_UNROLL = 8  # loads in flight a thread
FLAT_WARPS = 4
DEVICE = "cuda"  # "cpu" for a check of the two kernels under TRITON_INTERPRET=1


@triton.jit
def _split_kernel(Q, K, V, Part, stride_h, stride_n, keys_per_split, ROWS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Program (split, kv head): Q's ROWS rows against its keys, S = Q K^T and O += S V (no softmax)."""
    split, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + tl.arange(0, ROWS)[:, None] * HEAD_DIM + d[None, :])
    offs = tl.arange(0, BLOCK_N)[:, None] * stride_n + d[None, :]
    base = h.to(tl.int64) * stride_h
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    start = split * keys_per_split
    for n0 in tl.range(start, start + keys_per_split, BLOCK_N, num_stages=STAGES):
        k = tl.load(K + base + n0 * stride_n + offs)
        v = tl.load(V + base + n0 * stride_n + offs)
        s = tl.dot(q, tl.trans(k))
        acc = tl.dot(s.to(v.dtype), v, acc)
    part = Part + (split * tl.num_programs(1) + h) * ROWS * HEAD_DIM
    tl.store(part + tl.arange(0, ROWS)[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def _flat_kernel(K, V, Part, share, numel, VEC: tl.constexpr, UNROLL: tl.constexpr, WARPS: tl.constexpr):
    """Program p: the float32 sum of elements [p * share, (p + 1) * share) of K and of V (share a multiple of
    the 16-byte loads a step takes; the last program's share stops at numel)."""
    p = tl.program_id(0)
    lanes = tl.arange(0, UNROLL * 32 * WARPS * VEC)
    step = UNROLL * 32 * WARPS * VEC
    acc = tl.zeros([UNROLL * 32 * WARPS * VEC], tl.float32)
    begin = p.to(tl.int64) * share
    for i in range(0, share, step):
        at = begin + i + lanes
        acc += tl.load(K + at, mask=at < numel, other=0.0).to(tl.float32)
    for i in range(0, share, step):
        at = begin + i + lanes
        acc += tl.load(V + at, mask=at < numel, other=0.0).to(tl.float32)
    tl.store(Part + p, tl.sum(acc))


def _split_call(q16, k, v, part, splits, block_n, stages):
    keys = k.shape[2] // splits
    grid = (splits, HKV)
    return lambda: _split_kernel[grid](q16, k, v, part, k.stride(1), k.stride(2), keys, ROWS=16, HEAD_DIM=D,
                                       BLOCK_N=block_n, STAGES=stages, num_warps=4)  # fmt: skip


def _flat_share(numel: int, programs: int) -> int:
    step = FLAT_UNROLL * 32 * FLAT_WARPS * FLAT_VEC
    return triton.cdiv(numel, programs * step) * step


def _flat_call(k, v, part, programs):
    share = _flat_share(k.numel(), programs)
    return lambda: _flat_kernel[(programs,)](k, v, part, share, k.numel(), VEC=FLAT_VEC, UNROLL=FLAT_UNROLL,
                                             WARPS=FLAT_WARPS, num_warps=FLAT_WARPS)  # fmt: skip


def _inputs(length: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(1, HQ, 1, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(2, 1, HKV, length, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    return q, kv


def _calls(q, kv) -> dict:
    """Every provider on one set of buffers (outputs and partials allocated here, once)."""
    k, v = kv[0], kv[1]
    q16 = torch.zeros(16, D, device=DEVICE, dtype=kv.dtype)
    q16[:4] = q[0, :4, 0]
    out = torch.empty_like(q)
    calls = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
             "library": lambda: decode.decode_attention(q, k, v, out=out),
             "torch-sum": lambda: kv.sum(dtype=torch.float32)}  # fmt: skip
    for splits, block_n, stages in SPLIT_SETS:
        if k.shape[2] % (splits * block_n) == 0:
            part = torch.empty(splits * HKV * 16 * D, device=DEVICE, dtype=torch.float32)
            calls[f"split-s{splits}-n{block_n}-st{stages}"] = _split_call(
                q16, k, v, part, splits, block_n, stages
            )
    for programs in FLAT_PROGRAMS:
        part = torch.empty(programs, device=DEVICE, dtype=torch.float32)
        calls[f"flat-p{programs}"] = _flat_call(k, v, part, programs)
    return calls


def _check(q, kv) -> dict:
    """Each probe kernel's result against float64 (what it must have read): max relative error."""
    k, v = kv[0].double(), kv[1].double()
    q16 = torch.zeros(16, D, device=DEVICE, dtype=torch.float64)
    q16[:4] = q[0, :4, 0].double()
    errors = {}
    for splits, block_n, stages in SPLIT_SETS:
        if k.shape[2] % (splits * block_n):
            continue
        part = torch.empty(splits * HKV * 16 * D, device=DEVICE, dtype=torch.float32)
        _split_call(q16.to(kv.dtype), kv[0], kv[1], part, splits, block_n, stages)()
        ks, vs = k[0].unflatten(1, (splits, -1)), v[0].unflatten(1, (splits, -1))  # [Hkv, S, L/S, D]
        s = torch.einsum("rd,hsnd->shrn", q16, ks).to(kv.dtype).double()
        ref = torch.einsum("shrn,hsnd->shrd", s, vs)
        got = part.view(splits, HKV, 16, D).double()
        errors[f"split-s{splits}-n{block_n}-st{stages}"] = ((got - ref).norm() / ref.norm()).item()
    for programs in FLAT_PROGRAMS:
        part = torch.empty(programs, device=DEVICE, dtype=torch.float32)
        _flat_call(kv[0], kv[1], part, programs)()
        share = _flat_share(k.numel(), programs)
        pad = programs * share - k.numel()
        ref = sum(torch.nn.functional.pad(t.flatten(), (0, pad)).view(programs, -1).sum(1) for t in (k, v))
        errors[f"flat-p{programs}"] = ((part.double() - ref).norm() / ref.norm()).item()
    return errors


def _row(length: int) -> dict:
    q, kv = _inputs(length, length)
    errors = _check(q, kv)
    ok = {name: err < 2e-2 for name, err in errors.items()}
    calls = {name: call for name, call in _calls(q, kv).items() if ok.get(name, True)}
    plain = timing.time_interleaved(calls, reps=30)
    sets = [_inputs(length, length + 1 + i) for i in range(timing_layers(length))]
    makers = {name: (lambda i, name=name: _calls(*sets[i])[name]) for name in calls}
    graphs = timing.time_graphs_per_call(makers, layers=len(sets), reps=20)
    floor_us = kv.numel() * 2 / READ_GBPS[0] / 1e3
    row = {"length": length, "bytes": kv.numel() * 2, "floor_us": floor_us, "errors": errors, "plain": {},
           "graph": {}}  # fmt: skip
    for name, samples in plain.items():
        row["plain"][name] = timing.summarize(samples)["median_us"]
    for name, samples in graphs.items():
        row["graph"][name] = samples if isinstance(samples, str) else timing.summarize(samples)["median_us"]
    return row


def timing_layers(length: int) -> int:
    return 28  # distinct buffer sets in a graph (at 64k keys: 28 x 268 MB)


READ_GBPS = [0.0]


def main() -> None:
    path = sys.argv[2]
    READ_GBPS[0] = timing.measure_read_bandwidth() / 1e9
    doc = {"environment": environment_report(), "read_gbps": READ_GBPS[0], "rows": []}
    for length in LENGTHS:
        row = _row(length)
        doc["rows"].append(row)
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(
            f"L={length} floor {row['floor_us']:.1f} us; errors {max(row['errors'].values()):.1e}", flush=True
        )
        for name in row["plain"]:
            print(f"  {name:24s} plain {row['plain'][name]:7.1f}  graph {row['graph'].get(name)}", flush=True)


if __name__ == "__main__":
    main()
