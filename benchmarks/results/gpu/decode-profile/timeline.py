"""Issue 10 (scratch, kept with its results): where a decode call's time goes, program by program.

Nsight Compute (ncu_decode.py) showed the H100's SMs active 65-86% of a decode call: at 4k keys (16:8) the
kernel takes 12.5 us while each busy SM works ~8.4 us. This copy of the decode kernel reads %globaltimer at a
program's start and end and %clock64 at its start, after its keys (`attend`) and after its result
(`finish_split`, which includes the last program's merge), with the SM it ran on. Per shape it prints: the
spread of program starts (launch skew), the time over the keys (min / median / max), the finish (median, and
the merging programs'), and the spread of program ends; plain launches after a read flush of L2.

    python benchmarks/results/gpu/decode-profile/timeline.py OUT.json
"""

import json
import statistics
import sys

import torch
import triton
import triton.language as tl

from attnforge import environment
from attnforge.bench import timing
from attnforge.kernels import decode
from attnforge.kernels.split_kv import attend, finish_split, split_range

SHAPES = [(16, 8, 4096, None), (16, 8, 16384, None), (16, 8, 65536, None), (16, 8, 4352, 4096)]
FIELDS = 7  # g0, g2, c0, c1, c2, smid, g1


@triton.jit
def _clock_after(x):
    """%clock64, read after `x` (a scalar) is computed."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [x.to(tl.int32)], dtype=tl.int64,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _timed_kernel(
    Q, K, V, Out, KvLens, Times, PartO, Counters,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2, kv_len, num_kv_heads, num_splits, ml_offset,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_KV_STARTS: tl.constexpr, FP32_DOT: tl.constexpr,
    MERGE_LAST: tl.constexpr, USE_PDL: tl.constexpr, ALONE_TILES: tl.constexpr,
):  # fmt: skip
    # decode.py's _decode_kernel without PDL or kv_starts, with timestamps (Times: [programs, 7])
    g0 = tl.extra.cuda.globaltimer()
    split = tl.program_id(0)
    slot = tl.program_id(1)
    c0 = _clock_after(split)
    bh = slot // NUM_M_BLOCKS
    m_block = slot % NUM_M_BLOCKS
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)
    k_head, v_head = K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Q_LEN
    head = h * GROUP + rows // Q_LEN
    token = rows % Q_LEN
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qm + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    end = kv_len
    if HAS_KV_LENS:
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    alone, start, stop = split_range(0, end, split, num_splits, BLOCK_N, ALONE_TILES)
    last_visible = end - Q_LEN + token
    m_i, l_i, acc = attend(q, k_head, v_head, start, stop, end, last_visible, scale_log2, d, d_ok, stride_kn,
                           stride_kd, stride_vn, stride_vd, BLOCK_M, D_BLOCK, BLOCK_N, FP32_DOT)  # fmt: skip
    c1 = _clock_after(tl.sum(l_i, 0))
    g1 = tl.extra.cuda.globaltimer()
    o_ptrs = Out + b * stride_ob + head * stride_oh + token * stride_om
    finish_split(o_ptrs, acc, l_i, m_i, Out, PartO, Counters, split, alone, slot, b, h, m_block, d, d_ok,
                 row_ok, stride_ob, stride_oh, stride_om, stride_od, num_splits, ml_offset, GROUP, Q_LEN,
                 D_BLOCK, BLOCK_M, SPLIT, SPLITS_P2, PART_ROWS, S_CHUNK, MERGE_LAST)  # fmt: skip
    tl.debug_barrier()
    c2 = _clock_after(split)
    g2 = tl.extra.cuda.globaltimer()
    row = Times + (slot * num_splits + split).to(tl.int64) * 7
    tl.store(row, g0)
    tl.store(row + 1, g2)
    tl.store(row + 2, c0)
    tl.store(row + 3, c1)
    tl.store(row + 4, c2)
    tl.store(row + 5, tl.extra.cuda.smid().to(tl.int64))
    tl.store(row + 6, g1)


def _run(launch, q, k, v, lens, times):
    out = torch.empty_like(q)
    workspace = decode.DecodeWorkspace(q.device, launch.floats, launch.slots)
    lens_arg = lens if lens is not None else workspace.counters
    args = (q, k, v, out, lens_arg, times, workspace.partials, workspace.counters, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), 128**-0.5 * decode.LOG2E, k.shape[2], launch.num_kv_heads,
            launch.splits, launch.ml_offset)  # fmt: skip
    constants = {key: value for key, value in launch.constants.items() if key != "launch_pdl"}
    constants["USE_PDL"] = False
    return lambda: _timed_kernel[launch.grid](*args, **constants), out


def _summary(times):
    t = times.cpu().tolist()
    # the SM clock from the data: clock cycles over global nanoseconds per program
    clock_ghz = statistics.median((r[4] - r[2]) / max(r[1] - r[0], 1) for r in t)
    g0 = [r[0] for r in t]
    g2 = [r[1] for r in t]
    keys_us = [(r[3] - r[2]) / clock_ghz / 1000 for r in t]
    finish_us = [(r[4] - r[3]) / clock_ghz / 1000 for r in t]
    first = min(g0)
    return {
        "span_us": (max(g2) - first) / 1000,
        "start_spread_us": (max(g0) - first) / 1000,
        "end_spread_us": (max(g2) - min(g2)) / 1000,
        "first_end_us": (min(g2) - first) / 1000,
        "keys_us": [min(keys_us), statistics.median(keys_us), max(keys_us)],
        "finish_us": [min(finish_us), statistics.median(finish_us), max(finish_us)],
        "keys_end_spread_us": (max(r[6] for r in t) - min(r[6] for r in t)) / 1000,
        "sms": len({r[5] for r in t}),
        "clock_ghz": clock_ghz,
        "programs": [
            [(r[0] - first) / 1000, (r[6] - first) / 1000, (r[1] - first) / 1000, r[5]] for r in t
        ],  # fmt: skip
    }


def main(path):
    results = {"environment": environment.environment_report(), "rows": []}
    flusher = timing.L2Flusher()
    for hq, hkv, lkv, valid in SHAPES:
        q = torch.randn(1, hq, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, lkv, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = None if valid is None else torch.tensor([valid], device="cuda", dtype=torch.int32)
        launch = decode.decode_launch(tuple(q.shape), hkv, lkv, lens is not None, False, torch.bfloat16,
                                      q.device)  # fmt: skip
        times = torch.zeros(launch.slots * launch.splits, FIELDS, dtype=torch.int64, device="cuda")
        call, out = _run(launch, q, k, v, lens, times)
        want = decode.decode_attention(q, k, v, kv_lens=lens)
        spans = []
        for _ in range(12):
            flusher()
            call()
            torch.cuda.synchronize()
            spans.append(_summary(times))
        spans = spans[2:]
        best = sorted(spans, key=lambda s: s["span_us"])[len(spans) // 2]
        row = {"shape": f"{hq}:{hkv} Lkv {lkv}" + (f" valid {valid}" if valid else ""),
               "params": {n: launch.params[n] for n in ("BLOCK_N", "num_splits", "num_stages", "num_warps")},
               "max_abs_diff": float((out.float() - want.float()).abs().max()),
               "span_us_all": [s["span_us"] for s in spans], **best}  # fmt: skip
        results["rows"].append(row)
        with open(path, "w") as file:
            json.dump(results, file)
        print({key: value for key, value in row.items() if key != "programs"}, flush=True)
    for row in results["rows"]:
        print(f"{row['shape']:24s} span {row['span_us']:.1f} starts {row['start_spread_us']:.1f} ends "
              f"{row['end_spread_us']:.1f} (first {row['first_end_us']:.1f}) keys "
              f"{'/'.join(f'{x:.1f}' for x in row['keys_us'])} finish "
              f"{'/'.join(f'{x:.1f}' for x in row['finish_us'])} us on {row['sms']} SMs")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
