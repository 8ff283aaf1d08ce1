"""The decode kernel's launch parameters (no Triton code): shape buckets, the tuning store's entries or the
heuristic, and what a launch derives from them. Cached per bucket, so that a call pays a lookup, not this
arithmetic (each line of Python costs host time in eager generation)."""

from __future__ import annotations

import functools

import torch
import triton

from attnforge.kernels import tuning

# Upper bound of the split count (the merge's unrolled chunks are sized for it).
MAX_SPLITS = 128
# Shared memory the pipelined K/V tiles may take (Hopper has 227 KB per block; Ampere 163 KB).
SHARED_MEMORY_BUDGET = 160 * 1024
# Partial rows (splits x real rows) the heuristic lets the last program of a slot merge.
MERGE_ROWS = 256
# With at least this many SMs for each KV head of the batch, the heuristic splits the heads' rows into blocks
# of 16 (more programs; each reads its head's K/V, the second read mostly from L2). MQA 32:1 at B1 on the
# H100 (`tuning-decode-grid-20261206e.json`): at equal splits and tiles two 16-row blocks ran 0.98-1.51x the
# speed of one 32-row block (median 1.19-1.29x; best of each 11.4 / 12.7 us at 4k keys, 17.6 / 18.0 at 16k,
# d64 4k 10.9 / 11.1). GQA's 8 KV heads with Lq 8-16 ran slower so (`...20261206f.json`, "-lq8").
ROW_SPLIT_SMS_PER_HEAD = 32
# Splits a merge step unrolls (their loads in flight together); more would only grow the code.
MERGE_CHUNK = 16
# Floats of partial output rows a thread (of 4 warps) loads in one step of the last program's merge: by
# default 128 (16 splits of 8 rows at d128); a "merge_parts" launch keeps it to 80, what ptxas kept in
# flight as one run of loads (sm_90; 96 and 128 were cut into 7-9 runs, each waiting on the L2:
# `benchmarks/results/cpu/decode-sass/merge-parts-20261208.txt`).
MERGE_FLOATS, MERGE_FLOATS_PARTS = 128, 80
# Valid keys of a sequence that fit in this many tiles are read by split 0 alone, which writes the output:
# no partials and no merge for them (a static cache early in a generation: most splits would be empty).
ALONE_TILES = 2
# Head dims whose K/V rows a TMA tile reads whole (at most 256 bytes a row in 16 bits): the "tma" launch's.
TMA_HEAD_DIMS = (64, 128)
# How split partials are merged: by the program that arrives last ("last", one launch), or by a second kernel
# with one program per (slot, row) ("kernel"), launched early with programmatic dependent launch on Hopper
# ("kernel-pdl"; without PDL support it runs as "kernel").
COMBINE_MODES = ("last", "kernel", "kernel-pdl")


def decode_bucket(
    batch: int, kv_len: int, group: int, q_len: int, head_dim: int, has_kv_lens: bool = False
) -> str:
    """Shape bucket of the tuning store, e.g. 'd128-m4-b1-kv4k'; '-lq4' for 3-4 new tokens (torch then needs a
    causal mask: another race), '-lens' with kv_lens (a static or ragged cache: torch masks the whole buffer).
    """
    rows = group * q_len
    m = 1 if rows == 1 else min(64, triton.next_power_of_2(rows))
    b = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 10**9) if batch <= x)
    kv = next(x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 10**9) if kv_len <= x * 1024)
    lq = f"-lq{triton.next_power_of_2(q_len)}" if q_len > 1 else ""
    lens = "-lens" if has_kv_lens else ""
    return f"d{head_dim}-m{m}-b{b if b < 10**9 else 'max'}-kv{kv if kv < 10**9 else 'max'}k{lq}{lens}"


def heuristic_splits(units: int, tiles: int, sms: int) -> int:
    """Split count for `units` (batch x kv heads x row blocks) programs over `tiles` key tiles: as many splits
    as fit in one wave of the GPU (one program per SM), at most one per tile and MAX_SPLITS."""
    return max(1, min(sms // max(units, 1), tiles, MAX_SPLITS))


def heuristic_params(
    batch: int, kv_len: int, num_kv_heads: int, rows: int, head_dim: int, elem_bytes: int, sms: int
) -> dict:
    """Launch parameters without a tuning entry: 128-key tiles (fewer where a K+V tile would pass 64 KB),
    as many pipeline stages (up to 3) as fit in 160 KB of shared memory, and splits that fill one wave. The
    program that arrives last merges at most MERGE_ROWS partial rows (the merge is its tail); where the
    splits hold more (many rows a KV head: MQA), a second kernel merges them, one program per row
    ("kernel-pdl"), rather than fewer splits leaving most SMs idle (MQA at 16k keys ran 8 programs: 0.34x
    torch's SDPA on the H100, `tuning-decode-grid-20261206d.md`). Few KV heads take
    16-row blocks (ROW_SPLIT_SMS_PER_HEAD)."""
    row_bytes = triton.next_power_of_2(head_dim) * elem_bytes
    block_n = max(16, min(128, 32768 // row_bytes))
    stages = max(2, min(3, SHARED_MEMORY_BUDGET // (2 * block_n * row_bytes)))
    block_m = default_block_m(rows)
    if batch * num_kv_heads * ROW_SPLIT_SMS_PER_HEAD <= sms:
        block_m = 16  # few KV heads (MQA): rows in blocks of 16, more programs at each split count
    units = batch * num_kv_heads * triton.cdiv(rows, block_m)
    splits = heuristic_splits(units, triton.cdiv(kv_len, block_n), sms)
    params = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_splits": splits, "num_warps": 4,
              "num_stages": stages}  # fmt: skip
    merge = merge_for(splits, partial_rows(block_m, rows))
    return params if merge == "last" else {**params, "combine": merge}


def partial_rows(block_m: int, rows: int) -> int:
    """Rows a split's partial holds: its block's, at most the next power of two of the real `rows`."""
    return min(block_m, triton.next_power_of_2(rows))


def merge_lo_rows(rows: int, part_rows: int) -> int:
    """With "merge_parts", the last program merges a row block of `rows` real rows in `part_rows` partial
    rows in two parts where the rows no split wrote would take many registers: half the partial rows (all
    real), then the next power of two of the rest, at most a quarter of the first (GQA 5:1: 4 + 1 of 8; 9-10
    rows of 16). Returns the second part's rows, or 0 (one part)."""
    if rows >= part_rows:
        return 0
    hi = part_rows // 2
    lo = triton.next_power_of_2(rows - hi)
    return lo if 4 * lo <= hi else 0


def merge_chunk(splits: int, part_rows: int, merge_lo: int, d_block: int, parts: bool) -> int:
    """Splits a step of the last program's merge loads together (S_CHUNK): at most MERGE_CHUNK, the splits
    (to a power of two), and as many as keep MERGE_FLOATS (MERGE_FLOATS_PARTS with `parts`) floats of the
    rows it merges (`merge_lo` > 0: half the partial rows and `merge_lo`) a thread of 4 warps."""
    held = part_rows // 2 + merge_lo if merge_lo else part_rows
    floats = MERGE_FLOATS_PARTS if parts else MERGE_FLOATS
    fit = max(1, floats * 128 // (held * d_block))
    return max(1, min(triton.next_power_of_2(splits), MERGE_CHUNK, 1 << (fit.bit_length() - 1)))


def merge_for(splits: int, part_rows: int) -> str:
    """How a launch's splits are best merged by default: by the program that arrives last while that is at
    most MERGE_ROWS partial rows, else by a second kernel ("kernel-pdl")."""
    return "last" if splits * part_rows <= MERGE_ROWS else "kernel-pdl"


def default_block_m(rows: int) -> int:
    """Query rows per program: all G x Lq rows of a KV head up to 64 (one read of K/V for all of them)."""
    return max(16, min(64, triton.next_power_of_2(rows)))


def complete_params(params: dict, rows: int, kv_len: int) -> dict:
    """Tunable parameters (BLOCK_M optional, BLOCK_N, num_splits, num_warps, num_stages, alone_tiles optional,
    combine optional) plus what the launch derives: row blocks, splits within [1, tiles] (an entry may come
    from a longer cache in its bucket), the partial rows per split."""
    block_m = int(params.get("BLOCK_M") or default_block_m(rows))
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M={block_m} must be a power of two >= 16")
    splits = max(1, min(int(params["num_splits"]), triton.cdiv(kv_len, params["BLOCK_N"]), MAX_SPLITS))
    part_rows = partial_rows(block_m, rows)
    alone = int(params.get("alone_tiles", ALONE_TILES))
    if alone < 0:
        raise ValueError(f"alone_tiles={alone} must be >= 0 (0: only empty sequences skip the merge)")
    derived = {
        "alone_tiles": alone,
        "BLOCK_M": block_m,
        "m_blocks": triton.cdiv(rows, block_m),
        "rows": rows,
        "part_rows": part_rows,
    }
    return {**params, **derived, "num_splits": splits}


def kv_bound(kv_len: int) -> int:
    """The longest cache of `kv_len`'s bucket (1k, 2k, 4k, ... keys): the calls up to it share parameters."""
    return 1024 << (max(kv_len - 1, 0) >> 10).bit_length()


@functools.lru_cache(maxsize=1024)
def bucket_params(
    shape: tuple, num_kv_heads: int, kv_len: int, has_kv_lens: bool, dtype: torch.dtype, device: torch.device,
    captured: bool = False,
) -> dict:  # fmt: skip
    """Complete launch parameters (`complete_params`) for q of `shape` against `kv_len` keys (a bucket's
    bound, `kv_bound`): from the tuning store (for calls `captured` in a CUDA graph, its graph merge or graph
    launch where it has one), else the heuristic; a call caps the splits by its length."""
    batch, num_heads, q_len, head_dim = shape
    rows = num_heads // num_kv_heads * q_len
    bucket = decode_bucket(batch, kv_len, num_heads // num_kv_heads, q_len, head_dim, has_kv_lens)
    params = tuning.launch_params("decode", device, bucket, captured)
    if params is None:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        params = heuristic_params(
            batch, kv_len, num_kv_heads, rows, head_dim, elem_bytes, tuning.sm_count(device)
        )
    return complete_params(params, rows, kv_len)


tuning.on_reload(bucket_params.cache_clear)
