"""Decode attention: a few new query tokens against a long KV cache, GQA-packed, split-KV, one launch.

One program serves all Hq/Hkv query heads (times the Lq new tokens) of one KV head over one slice ("split") of
the valid keys, so keys and values are read once. The valid keys are shared evenly between the splits in
whole tiles, so a static cache (few valid keys in a long buffer) costs what a contiguous cache of its valid
length costs. Each split writes a partial (max, sum, unnormalized output) for its real rows only, then bumps a
per-slot arrival counter; the program that arrives last merges the partials, writes the output and resets the
counter. With one split the program writes the output directly, and so does split 0 for a sequence whose valid
keys fit in `alone_tiles` tiles (the other splits of that slot do nothing).

On Hopper a tuning entry may read K/V through TMA descriptors instead of pointers (`tma`, `tma_launchable`):
a tile that would pass a valid length is then read shifted back to end there, so keys at or past it are not
read either way.

Valid lengths are clamped to [0, Lkv] on the device: no value of `kv_lens` can make the kernel read outside
the cache, and there is no host sync. A left-padded batch passes `kv_starts` too (the first valid key per
sequence, clamped to [0, its length]): the splits share keys [start, end), and padding is never read.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from attnforge.config import (
    MAX_DECODE_QUERY_LEN,
    SUPPORTED_HEAD_DIMS,
    check_lengths,
    check_qkv,
    resolve_scale,
)
from attnforge.environment import fp32_dot, triton_interpret
from attnforge.kernels import temporary_workspaces, tuning, workspaces_are_temporary
from attnforge.kernels.decode_params import (
    COMBINE_MODES,
    MERGE_CHUNK,
    MERGE_ROWS,
    TMA_HEAD_DIMS,
    bucket_params,
    complete_params,
    decode_bucket,  # noqa: F401 - the optimizer finds a kernel's buckets as `<kind>_bucket` in its module
    kv_bound,
    merge_chunk,
    merge_lo_rows,
)
from attnforge.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_options, pdl_supported
from attnforge.kernels.split_kv import attend, combine_kernel, finish_split, split_range
from attnforge.kernels.tma import descriptor, tma_aligned, tma_capable

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, KvLens, KvStarts, PartO, Counters,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2, kv_len, num_kv_heads, num_splits, ml_offset,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_KV_STARTS: tl.constexpr, FP32_DOT: tl.constexpr,
    MERGE_LAST: tl.constexpr, USE_PDL: tl.constexpr, ALONE_TILES: tl.constexpr, USE_TMA: tl.constexpr,
    MERGE_LO: tl.constexpr = 0,
):  # fmt: skip
    # Load q, share the valid keys between the splits, the online softmax over this split's keys, then the
    # output or the partial and, with MERGE_LAST, the last program's merge (helpers below, shared with
    # kernels/decode_step.py).
    split = tl.program_id(0)
    slot = tl.program_id(1)  # (batch, kv head, block of query rows)
    bh = slot // NUM_M_BLOCKS
    m_block = slot % NUM_M_BLOCKS
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)
    if USE_TMA:  # K and V are 4-d descriptors of [B, Hkv, Lkv, D], read at (b, h)
        k_head, v_head = K, V
    else:
        k_head, v_head = K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh
    if USE_PDL:  # the next kernel (the merge, or the caller's) may start launching; it waits for this grid
        gdc_launch_dependents()
        gdc_wait()  # launched with PDL too: the previous kernel's writes (q, the cache) have landed

    # Row = head_in_group * Q_LEN + token: the G heads times the Lq new tokens share one read of K and V.
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
    first, end = _valid_keys(KvLens, KvStarts, b, kv_len, HAS_KV_LENS, HAS_KV_STARTS)
    alone, start, stop = split_range(first, end, split, num_splits, BLOCK_N, ALONE_TILES)
    last_visible = end - Q_LEN + token  # bottom-right causal among the new tokens; also hides n >= end
    m_i, l_i, acc = attend(q, k_head, v_head, start, stop, end, last_visible, scale_log2, d, d_ok, stride_kn,
                           stride_kd, stride_vn, stride_vd, BLOCK_M, D_BLOCK, BLOCK_N, FP32_DOT,
                           b.to(tl.int32), h.to(tl.int32), USE_TMA)  # fmt: skip
    o_ptrs = Out + b * stride_ob + head * stride_oh + token * stride_om  # [BLOCK_M]: each row's output
    finish_split(o_ptrs, acc, l_i, m_i, Out, PartO, Counters, split, alone, slot, b, h, m_block, d, d_ok,
                 row_ok, stride_ob, stride_oh, stride_om, stride_od, num_splits, ml_offset, GROUP, Q_LEN,
                 D_BLOCK, BLOCK_M, SPLIT, SPLITS_P2, PART_ROWS, S_CHUNK, MERGE_LAST, MERGE_LO)  # fmt: skip


@triton.jit
def _valid_keys(KvLens, KvStarts, b, kv_len, HAS_KV_LENS: tl.constexpr, HAS_KV_STARTS: tl.constexpr):
    """Sequence b's valid keys [first, end), clamped on the device: never outside the cache."""
    if HAS_KV_LENS:  # noqa: SIM108 - clamped in its own dtype
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    else:
        end = kv_len
    if HAS_KV_STARTS:  # noqa: SIM108 - left padding: keys before the first valid one are never read
        first = tl.minimum(tl.maximum(tl.load(KvStarts + b), 0), end).to(tl.int32)
    else:
        first = 0
    return first, end


# ------------------------------------------------------------------------------------------------------------
# Host side: validation, launch parameters, workspace, launch.


def _check_inputs(q, k, v, kv_lens, kv_starts, out) -> None:
    check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[3]} is not supported {SUPPORTED_HEAD_DIMS}")
    if not 1 <= q.shape[2] <= MAX_DECODE_QUERY_LEN:
        accepted = f"1..{MAX_DECODE_QUERY_LEN}"
        raise ValueError(f"q_len={q.shape[2]} is not supported by decode_attention ({accepted}); "
                         "use prefill_attention for longer queries")  # fmt: skip
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q_len={q.shape[2]} exceeds kv_len={k.shape[2]}: the new tokens must be in the cache"
        )
    check_lengths("kv_lens", kv_lens, q.shape[0], q.device)
    check_lengths("kv_starts", kv_starts, q.shape[0], q.device)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")  # fmt: skip


class DecodeWorkspace:
    """Scratch for split-KV decode calls: partials (float32) and arrival counters (int32, zero between calls).

    One workspace serves one stream of calls at a time: calls that may run concurrently (two streams, two
    CUDA graphs replayed side by side) need their own. Pass one to `decode_attention(..., workspace=)` to own
    it (e.g. one per captured graph); without one, each stream gets its own (see `default_workspace`).
    Buffers only grow; grown-out buffers stay alive, so pointers recorded in a captured graph stay valid.
    """

    def __init__(self, device: torch.device | str, partial_floats: int = 0, counters: int = 0) -> None:
        self.device = torch.device(device)
        self.partials = torch.empty(max(partial_floats, 1), dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(max(counters, 1), dtype=torch.int32, device=self.device)
        self._retired: list[torch.Tensor] = []
        self.fixed = False  # True: the caller's buffers, never replaced (`over`)

    def buffers(self, partial_floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(partials, counters) of at least these sizes; grows (outside graph capture only)."""
        if self.partials.numel() < partial_floats or self.counters.numel() < counters:
            if self.fixed:
                raise ValueError(
                    f"decode workspace too small: needs {partial_floats} partial floats and {counters} "
                    f"counters, has {self.partials.numel()} and {self.counters.numel()}; size it with "
                    "DecodeWorkspace.for_call"
                )
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"decode workspace too small during CUDA-graph capture: needs {partial_floats} partial "
                    f"floats and {counters} counters, has {self.partials.numel()} and "
                    f"{self.counters.numel()}; size it before capture (DecodeWorkspace.for_call)"
                )
            self._retired += [self.partials, self.counters]
            self.partials = torch.empty(
                max(partial_floats, self.partials.numel()), dtype=torch.float32, device=self.device
            )
            self.counters = torch.zeros(
                max(counters, self.counters.numel()), dtype=torch.int32, device=self.device
            )
        return self.partials, self.counters

    @classmethod
    def over(cls, partials: torch.Tensor, counters: torch.Tensor) -> DecodeWorkspace:
        """A workspace on these buffers (float32 partials, int32 counters, zero between calls), which it never
        replaces: a call that needs more raises (what a compiled graph's op gets from its caller)."""
        workspace = cls.__new__(cls)  # allocates nothing: the op launches nothing but the kernel
        workspace.device, workspace.partials, workspace.counters = partials.device, partials, counters
        workspace._retired, workspace.fixed = [], True
        return workspace

    @classmethod
    def for_call(cls, q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None = None):
        """A workspace large enough for `decode_attention(q, k, v, kv_lens=...)` with these shapes."""
        return cls(q.device, *workspace_size(q, k, kv_lens))


def workspace_size(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None = None) -> tuple[int, int]:
    """(partial floats, counters) a call with q `[B, Hq, Lq, D]` and k `[B, Hkv, Lkv, D]` needs, eager or
    captured in a CUDA graph (whose launch may differ: the tuning entry's graph launch)."""
    has_lens = kv_lens is not None
    launches = [decode_launch(tuple(q.shape), k.shape[1], k.shape[2], has_lens, False, q.dtype, q.device,
                              captured=captured) for captured in (False, True)]  # fmt: skip
    return max(launch.floats for launch in launches), max(launch.slots for launch in launches)


_DEFAULT_WORKSPACES: dict[tuple, DecodeWorkspace] = {}
_WORKSPACE_LOCK = threading.Lock()


def default_workspace(device: torch.device, partial_floats: int, counters: int) -> DecodeWorkspace:
    """The workspace a call without `workspace=` uses: one per (device, stream) in eager mode; a new one per
    call during CUDA-graph capture and inside `temporary_workspaces()` (torch.compile's ops): a temporary like
    any operator's, freed when the call returns (in a graph, its counters are zeroed at every replay)."""
    if workspaces_are_temporary() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return DecodeWorkspace(device, partial_floats, counters)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    with _WORKSPACE_LOCK:
        workspace = _DEFAULT_WORKSPACES.get(key)
        if workspace is None:
            workspace = _DEFAULT_WORKSPACES[key] = DecodeWorkspace(device, partial_floats, counters)
    return workspace


def tma_launchable(head_dim: int, dtype: torch.dtype, device, has_kv_starts: bool) -> bool:
    """A launch may read K/V through TMA descriptors: a Hopper (or later) GPU, 16-bit, a head_dim in
    TMA_HEAD_DIMS, no `kv_starts` (a tile shifted back to end at the valid length could read a left-padded
    sequence's padding)."""
    return head_dim in TMA_HEAD_DIMS and not has_kv_starts and tma_capable(device, dtype)


class DecodeLaunch:
    """The kernel's launch for one call shape with everything but the tensors computed once (grid,
    compile-time constants, workspace sizes): each line of Python costs host time per call."""

    __slots__ = ("params", "grid", "constants", "num_kv_heads", "splits", "slots", "floats", "ml_offset",
                 "combine_grid", "combine_constants", "twin", "tma_block", "tma_constants")  # fmt: skip

    def __init__(self, p: dict, shape: tuple, num_kv_heads: int, dtype, device, has_kv_lens, has_kv_starts):
        batch, num_heads, q_len, head_dim = shape
        combine = p.get("combine", "last")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine={combine!r} is not one of {COMBINE_MODES}")
        splits, part_rows = p["num_splits"], p["part_rows"]
        # "merge_parts": the last program's merge in two parts where rows are missing, its steps sized to
        # what stays in flight (opt-in until measured on a GPU: docs/notes/decode.md, twenty-third session;
        # `split_kv.merge_if_last`)
        parts = bool(p.get("merge_parts")) and combine == "last"
        merge_lo = merge_lo_rows(p["rows"], part_rows) if parts else 0
        d_block, splits_p2 = triton.next_power_of_2(head_dim), triton.next_power_of_2(splits)
        # PDL: "kernel-pdl" starts its merge kernel early; "last" lets the caller's next kernel (a decode
        # step's output projection) start early and wait. Either way this kernel waits for its predecessor.
        use_pdl = combine != "kernel" and pdl_supported(torch.device(device))
        pdl_merge = use_pdl and combine == "kernel-pdl" and splits > 1
        self.params, self.num_kv_heads, self.splits = p, num_kv_heads, splits
        self.slots = batch * num_kv_heads * p["m_blocks"]  # programs per split, and arrival counters
        # Partials: O per row, then (m, l) per row.
        self.ml_offset = self.slots * splits * part_rows * d_block
        self.floats = 1 if splits == 1 else self.ml_offset + self.slots * splits * part_rows * 2
        self.grid = (splits, self.slots)
        shared = {
            "GROUP": num_heads // num_kv_heads, "Q_LEN": q_len, "HEAD_DIM": head_dim, "D_BLOCK": d_block,
            "BLOCK_M": p["BLOCK_M"], "NUM_M_BLOCKS": p["m_blocks"], "SPLITS_P2": splits_p2,
            "PART_ROWS": part_rows,
        }  # fmt: skip
        self.constants = {
            **shared, "BLOCK_N": p["BLOCK_N"], "SPLIT": splits > 1, "HAS_KV_LENS": has_kv_lens,
            "HAS_KV_STARTS": has_kv_starts, "FP32_DOT": fp32_dot(dtype), "MERGE_LAST": combine == "last",
            # the second merge kernel merges every split: there, no split may skip its partial
            "ALONE_TILES": p["alone_tiles"] if combine == "last" else -1,
            # splits whose partials one merge step loads at once (each step one round trip to L2, where
            # ptxas keeps its loads together: `decode_params.merge_chunk`), and the two-part merge's rows
            "S_CHUNK": merge_chunk(splits, part_rows, merge_lo, d_block, parts), "MERGE_LO": merge_lo,
            "num_warps": p["num_warps"], "num_stages": p["num_stages"], **pdl_options(use_pdl),
            "USE_TMA": False,
        }  # fmt: skip
        # K/V through TMA (the entry's "tma") for calls whose tensors allow it (`_args`), else pointers
        tma = bool(p.get("tma")) and tma_launchable(head_dim, dtype, device, has_kv_starts)
        self.tma_block = [1, 1, p["BLOCK_N"], d_block] if tma else None
        self.tma_constants = {**self.constants, "USE_TMA": True}
        merged_apart = splits > 1 and combine != "last"
        self.combine_grid = (self.slots * part_rows,) if merged_apart else None
        self.combine_constants = {**shared, "S_CHUNK": min(splits_p2, MERGE_CHUNK), "num_warps": 4,
                                  "num_stages": 2, **pdl_options(pdl_merge)}  # fmt: skip
        # The launch captured calls of this bucket use for kv_len keys, where it differs (`_launch_for`):
        # compiled by this launch's first call, since nothing may compile while a CUDA graph is captured.
        self.twin: Callable[[int], DecodeLaunch] | None = None

    def __call__(self, q, k, v, out, scale: float, kv_lens=None, kv_starts=None, workspace=None) -> None:
        """Launch on validated inputs of the prepared shape (q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` with
        Lkv in the prepared bucket), writing `out` `[B, Hq, Lq, D]`."""
        workspace = workspace or default_workspace(q.device, self.floats, self.slots)
        partials, counters = workspace.buffers(self.floats, self.slots)
        # The kernel reads lengths[b] at pointer + b: a view (a column of a [B, 2] tensor) is made contiguous.
        lens = kv_lens.contiguous() if kv_lens is not None else counters  # unread without HAS_KV_LENS
        starts = kv_starts.contiguous() if kv_starts is not None else counters  # unread without HAS_KV_STARTS
        tensors = (q, k, v, out, lens, starts, partials, counters)
        args, constants = self._args(*tensors, scale)
        _decode_kernel[self.grid](*args, **constants)
        if self.combine_grid is not None:
            combine_kernel[self.combine_grid](*self._combine_args(out, partials), **self.combine_constants)
        if self.twin is not None:
            self._warm_twin(tensors, scale)

    def _args(self, q, k, v, out, lens, starts, partials, counters, scale: float) -> tuple[tuple, dict]:
        """The kernel's arguments and constants (K and V as `kv_sources` gives them)."""
        k_src, v_src, constants = self.kv_sources(k, v)
        args = (q, k_src, v_src, out, lens, starts, partials, counters, *q.stride(), *k.stride(), *v.stride(),
                *out.stride(), scale * LOG2E, k.shape[2], self.num_kv_heads, self.splits,
                self.ml_offset)  # fmt: skip
        return args, constants

    def kv_sources(self, k, v) -> tuple:
        """(K, V, constants) for k/v `[B, Hkv, Lkv, D]`: 4-d TMA descriptors where this launch reads through
        TMA and their strides allow it (USE_TMA set), else the tensors themselves (pointers)."""
        if self.tma_block is None or not tma_aligned(k, v):
            return k, v, self.constants
        return descriptor(k, self.tma_block), descriptor(v, self.tma_block), self.tma_constants

    def _combine_args(self, out, partials) -> tuple:
        return (out, partials, *out.stride(), self.num_kv_heads, self.splits, self.ml_offset)

    def _warm_twin(self, tensors: tuple, scale: float) -> None:
        """Compile and load the twin's kernels for these arguments, without running them (once)."""
        make, self.twin = self.twin, None
        if triton_interpret():  # the interpreter compiles nothing
            return
        twin = make(tensors[1].shape[2])
        args, constants = twin._args(*tensors, scale)
        compiled = [_decode_kernel.warmup(*args, grid=twin.grid, **constants)]
        if twin.combine_grid is not None:
            combine_args = twin._combine_args(tensors[3], tensors[6])  # out, partials
            compiled.append(combine_kernel.warmup(*combine_args, grid=twin.combine_grid,
                                                  **twin.combine_constants))  # fmt: skip
        for kernel in compiled:
            _ = kernel.run  # the launcher property loads the module onto the GPU


def decode_launch(shape: tuple, num_kv_heads: int, kv_len: int, has_kv_lens: bool, has_kv_starts: bool,
                  dtype: torch.dtype, device, params: dict | None = None,
                  captured: bool = False) -> DecodeLaunch:  # fmt: skip
    """The launch for q of `shape` against `kv_len` keys: parameters from the tuning store or the heuristic
    (cached per bucket and split count; with the entry's graph merge or launch for calls `captured` in a CUDA
    graph), or `params` (keys BLOCK_M optional, BLOCK_N, num_splits, num_warps, num_stages, combine optional:
    for tuning sweeps, built anew)."""
    bound = kv_bound(kv_len)
    if params is not None:
        p = bucket_params(shape, num_kv_heads, bound, has_kv_lens, dtype, device)
        p = complete_params({**p, **params, "BLOCK_M": params.get("BLOCK_M")}, p["rows"], kv_len)
        return DecodeLaunch(p, shape, num_kv_heads, dtype, device, has_kv_lens, has_kv_starts)
    p = bucket_params(shape, num_kv_heads, bound, has_kv_lens, dtype, device, captured)
    return _launch_for(shape, num_kv_heads, bound, _splits(p, kv_len), has_kv_lens, has_kv_starts, dtype,
                       device, captured)  # fmt: skip


def _splits(p: dict, kv_len: int) -> int:
    """The bucket's split count for a call of `kv_len` keys: an entry may be for longer caches."""
    return max(1, min(p["num_splits"], -(-kv_len // p["BLOCK_N"])))


@functools.lru_cache(maxsize=4096)
def _launch_for(shape, num_kv_heads, bound, splits, has_kv_lens, has_kv_starts, dtype, device, captured):
    """One launch per bucket, split count and mode. Where captured calls launch otherwise (the entry's graph
    merge, or its graph launch), a plain launch holds the captured one as its twin (for its first call's
    length: a static cache's), compiled at that call; nothing is added to later calls."""
    p = bucket_params(shape, num_kv_heads, bound, has_kv_lens, dtype, device, captured)
    launch = DecodeLaunch({**p, "num_splits": splits}, shape, num_kv_heads, dtype, device, has_kv_lens,
                          has_kv_starts)  # fmt: skip
    twin = None if captured else bucket_params(shape, num_kv_heads, bound, has_kv_lens, dtype, device, True)
    if twin is not None and twin != p:
        launch.twin = lambda kv_len: _launch_for(shape, num_kv_heads, bound, _splits(twin, kv_len),
                                                 has_kv_lens, has_kv_starts, dtype, device, True)  # fmt: skip
    return launch


tuning.on_reload(_launch_for.cache_clear)


@functools.lru_cache(maxsize=1024)
def merged_in_kernel(shape: tuple, num_kv_heads: int, kv_len: int, dtype, device) -> DecodeLaunch:
    """The launch of a call with kv_lens (its tuning entry's tiles and splits, or the heuristic's), merged by
    the program that arrives last whatever merge the entry picked (its splits then hold at most MERGE_ROWS
    partial rows): a kernel that must stay one launch (`decode_step.py`) takes its parameters from here."""
    p = bucket_params(shape, num_kv_heads, kv_bound(kv_len), True, dtype, device)
    splits = max(1, min(_splits(p, kv_len), MERGE_ROWS // p["part_rows"]))
    p = {**p, "num_splits": splits, "combine": "last"}
    return DecodeLaunch(p, shape, num_kv_heads, dtype, device, True, False)


tuning.on_reload(merged_in_kernel.cache_clear)


def launch_decode(
    q, k, v, out, *, scale: float, kv_lens=None, kv_starts=None, params: dict | None = None, workspace=None
) -> None:
    """Launch the kernel on validated inputs, writing `out`. `params` overrides the tuning table (see
    `decode_launch`): for tuning sweeps; users call decode_attention."""
    captured = q.is_cuda and torch.cuda.is_current_stream_capturing()
    launch = decode_launch(tuple(q.shape), k.shape[1], k.shape[2], kv_lens is not None, kv_starts is not None,
                           q.dtype, q.device, params, captured)  # fmt: skip
    launch(q, k, v, out, scale, kv_lens, kv_starts, workspace)


def prepared_decode(query: torch.Size, key: torch.Size, dtype: torch.dtype, device: torch.device):
    """For a caller that checked its calls once (a decode plan: every call has q of shape `query` `[B, Hq, 1,
    D]`, k/v of shape `key` `[B, Hkv, Lkv, D]`, this dtype and device, and the kernel supports them): a
    function `(q, k, v, scale) -> out [B, Hq, 1, D]` without per-call checks or lookups, on the workspace of
    the current stream (or a temporary one while a CUDA graph is captured)."""
    plain, captured = (decode_launch(tuple(query), key[1], key[2], False, False, dtype, device, None, mode)
                       for mode in (False, True))  # fmt: skip
    workspace = default_workspace(torch.device(device), max(plain.floats, captured.floats),
                                  max(plain.slots, captured.slots))  # fmt: skip
    default_scale = query[3] ** -0.5
    on_gpu = torch.device(device).type == "cuda"

    def call(q, k, v, scale):
        out = torch.empty(query, dtype=dtype, device=device)
        launch = captured if on_gpu and torch.cuda.is_current_stream_capturing() else plain
        launch(q, k, v, out, default_scale if scale is None else scale, None, None, workspace)
        return out

    return call


# ------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile; capturable in CUDA graphs) and the public function.


@torch.library.custom_op("attnforge::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               kv_lens: torch.Tensor | None, kv_starts: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    with temporary_workspaces():
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts)
    return out


@_decode_op.register_fake
def _(q, k, v, scale, kv_lens, kv_starts):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnforge::decode_attention_in", mutates_args=("partials", "counters"))
def _decode_in_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  kv_lens: torch.Tensor | None, kv_starts: torch.Tensor | None, partials: torch.Tensor,
                  counters: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The op on a caller's workspace (`partials`, `counters`): no scratch allocated or zeroed per call (the
    kernel leaves the counters at zero)."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts,
                  workspace=DecodeWorkspace.over(partials, counters))  # fmt: skip
    return out


@_decode_in_op.register_fake
def _(q, k, v, scale, kv_lens, kv_starts, partials, counters):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnforge::decode_attention_out", mutates_args=("out",))
def _decode_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   kv_lens: torch.Tensor | None, kv_starts: torch.Tensor | None,
                   out: torch.Tensor) -> None:  # fmt: skip
    with temporary_workspaces():
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts)


@_decode_out_op.register_fake
def _(q, k, v, scale, kv_lens, kv_starts, out):
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache (GQA/MQA/MHA native, split-KV, one launch).

    Args:
        q: `[B, Hq, Lq, D]`, Lq in 1..16; causal among the new tokens, bottom-right aligned to the cache.
        k, v: `[B, Hkv, Lkv, D]`, any strides (e.g. a slice of a preallocated cache); Hq % Hkv == 0.
        scale: softmax scale (a finite number > 0), default 1/sqrt(D).
        kv_lens: int32/int64 `[B]` valid length per sequence (the new tokens are its last Lq positions);
            keys at or beyond it are never read. Values are clamped to [0, Lkv] on the GPU (no host sync):
            a length above Lkv reads the whole cache, a negative one reads nothing (output 0).
        kv_starts: int32/int64 `[B]` first valid key per sequence (a left-padded batch): keys before it are
            never read. Clamped to [0, valid length] on the GPU; default 0.
        out: optional `[B, Hq, Lq, D]` buffer written in place (no allocation, for CUDA-graph capture).
        workspace: optional DecodeWorkspace owned by the caller (one per concurrently running stream or
            graph), sized before capture or compilation (`DecodeWorkspace.for_call`); default: one per
            stream, and a fresh one per call while a CUDA graph is captured or inside a compiled graph.

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (`out` when given). D in 64, 80, 96, 128, 256; fp16/bf16/fp32.
    """
    _check_inputs(q, k, v, kv_lens, kv_starts, out)
    scale = resolve_scale(scale, q.shape[3])
    if not torch.compiler.is_compiling():  # eager: skip the dispatcher's overhead (~10 us a call)
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
        launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, kv_starts=kv_starts, workspace=workspace)
        return out
    if workspace is not None:  # the caller's buffers: nothing allocated or zeroed per call in the graph
        result = _decode_in_op(q, k, v, scale, kv_lens, kv_starts, workspace.partials, workspace.counters)
        return result if out is None else out.copy_(result)
    if out is None:
        return _decode_op(q, k, v, scale, kv_lens, kv_starts)
    _decode_out_op(q, k, v, scale, kv_lens, kv_starts, out)
    return out
