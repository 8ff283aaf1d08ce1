"""Prefill attention: many query tokens against keys/values (fresh prompt or chunked prefill against a cache).

FlashAttention-2 style: one program per (batch, query head, block of BLOCK_M query rows) walks the visible key
blocks with an online softmax in base 2. GQA is native: a program reads its KV head directly, and the query
heads of one KV head sit next to each other in the grid so their K/V tiles are shared through L2. Causal is
bottom-right aligned; per program the key range splits into full blocks every row sees (no masking) and the
blocks on the diagonal or at the valid-length edge (masked), and blocks above the diagonal are never loaded.
The heaviest query blocks (the last ones under a causal mask) are launched first to shorten the tail.
On Hopper, K/V tiles can come through TMA descriptors instead of pointer loads (a tuning-table choice, used
only when the strides allow it). On sm_90 a launch can also be warp-specialized ("ws"): one loop over every
visible key block, each masked, Q/K/V through descriptors made on the device, which Triton 3.6 splits into
a TMA producer warp and two consumer warpgroups (it splits no kernel with two loops or a pointer load of Q).
Or it runs the Gluon kernel of kernels/prefill_gluon.py ("gluon": explicit producer and consumer partitions,
lean blocks unmasked, optionally FA3's ping-pong, and persistent: one program an SM). Tile sizes, warps,
pipeline depth, TMA, "ws" and "gluon" come from kernels/tuning.json per shape bucket (`attnforge tune
--preset prefill-grid` measures them), else from a heuristic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnforge.config import SUPPORTED_HEAD_DIMS, check_lengths, check_qkv, resolve_scale
from attnforge.environment import fp32_dot
from attnforge.kernels import tuning
from attnforge.kernels.tma import descriptor, tma_supported

try:  # the Gluon launch (Gluon's Hopper API: triton >= 3.5)
    from attnforge.kernels import prefill_gluon
except ImportError:  # pragma: no cover - older triton
    prefill_gluon = None

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _load_kv(src, b, h, n0, n, end, d_ok, BLOCK_N: tl.constexpr, D_BLOCK: tl.constexpr,
             MASKED: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """One [BLOCK_N, D_BLOCK] tile of K or V at key n0: through a TMA descriptor (`src` a 4-d descriptor of
    [B, Hkv, Lkv, D]) or pointers (`src` the tile's pointers). MASKED: keys at or past `end` become 0; a
    pointer load never reads them, a TMA load zeroes them after the read."""
    if USE_TMA:
        tile = src.load([b, h, n0, 0]).reshape(BLOCK_N, D_BLOCK)
        if MASKED:
            tile = tl.where((n < end)[:, None], tile, tl.zeros_like(tile))
    elif MASKED:
        tile = tl.load(src, mask=(n < end)[:, None] & d_ok[None, :], other=0.0)
    elif PAD_D:
        tile = tl.load(src, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(src)
    return tile


@triton.jit
def _attn_stage(
    acc, l_i, m_i, q, k_src, v_src, mask_ptrs, b, kv_head, k_row0, v_row0, d_ok, last_visible, lo, hi, end,
    stride_kn, stride_vn, stride_mn, scale_log2,
    BLOCK_N: tl.constexpr, D_BLOCK: tl.constexpr, DIAGONAL: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr, FP32_DOT: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) of one program (k_src/v_src: pointers at key lo, or TMA descriptors; k_row0/v_row0:
    the row of key 0 in WARP_SPEC's 2-d descriptors). DIAGONAL: mask keys past `end` and, with CAUSAL, past
    each row's last visible key. Off-diagonal blocks without an
    attn_mask take the lean path (every logit finite). WARP_SPEC (no attn_mask): every block of [0, diagonal)
    in one loop under Triton's warp specialization, k_src/v_src 2-d descriptors over the rows of K and V (this
    sequence and head's at k_row0/v_row0) that end at its valid keys (TMA zero-fills past them), each block
    masked."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        n0 = tl.multiple_of(n0, BLOCK_N)
        n = n0 + offs_n
        if WARP_SPEC:  # TMA zero-fills past the valid keys; the mask below takes them out
            k = k_src.load([k_row0 + n0, 0])
        else:
            k = _load_kv(k_src, b, kv_head, n0, n, end, d_ok, BLOCK_N, D_BLOCK, DIAGONAL, PAD_D, USE_TMA)
        if FP32_DOT:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if WARP_SPEC:
            if CAUSAL:
                qk = tl.where(n[None, :] <= last_visible[:, None], qk, float("-inf"))
            else:
                qk = tl.where((n < end)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays 0
            p = tl.math.exp2(qk * scale_log2 - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        elif DIAGONAL or MASK_KIND != 0:
            qk = qk * scale_log2
            if MASK_KIND == 1:
                keep = tl.load(mask_ptrs, mask=(n < end)[None, :], other=0)
                qk = tl.where(keep != 0, qk, float("-inf"))
            elif MASK_KIND == 2:
                bias = tl.load(mask_ptrs, mask=(n < end)[None, :], other=0.0).to(tl.float32)
                # Clamp finite values so finfo.min stays finite after the log2 scaling (-inf stays -inf).
                bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -1.0e37))
                qk += bias * 1.4426950408889634  # LOG2E
            if DIAGONAL:
                visible = (n < end)[None, :]
                if CAUSAL:
                    visible = visible & (n[None, :] <= last_visible[:, None])
                qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays 0
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if WARP_SPEC:
            v = v_src.load([v_row0 + n0, 0])
        else:
            v = _load_kv(v_src, b, kv_head, n0, n, end, d_ok, BLOCK_N, D_BLOCK, DIAGONAL, PAD_D, USE_TMA)
        if FP32_DOT:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        if not (USE_TMA or WARP_SPEC):
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            mask_ptrs += BLOCK_N * stride_mn
    return acc, l_i, m_i


# One kernel body on purpose (~115 lines, over the 60-line rule): the per-stage loop is already factored into
# _attn_stage; what remains (pointers or descriptors, the two stages or the warp-specialized loop, the store)
# reads best in one place.
@triton.jit
def _prefill_kernel(
    Q, K, V, Out, KvLens, QLens, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    scale_log2, q_len, kv_len, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr, MASK_KIND: tl.constexpr, USE_TMA: tl.constexpr,
    FP32_DOT: tl.constexpr, WARP_SPEC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # (batch, query head); the heads of one KV head are neighbours
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # last (heaviest under causal) blocks first
    b = (bh // num_heads).to(tl.int64)
    head = (bh % num_heads).to(tl.int64)
    kv_head = head // GROUP

    # Lengths are clamped here, in their own dtype (an int64 beyond 2^31 must not wrap): whatever they hold,
    # no load leaves the buffers. kv_lens > Lkv acts as Lkv, < 0 as 0; q_lens likewise within [0, Lq].
    end = kv_len
    if HAS_KV_LENS:
        end = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), kv_len).to(tl.int32)
    qlen = q_len
    if HAS_Q_LENS:
        qlen = tl.minimum(tl.maximum(tl.load(QLens + b), 0), q_len).to(tl.int32)

    m0 = m_block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_BLOCK)
    d_ok = d < HEAD_DIM
    rows64 = rows.to(tl.int64)
    b32, kvh32 = b.to(tl.int32), kv_head.to(tl.int32)  # TMA coordinates
    if WARP_SPEC:  # Q through TMA too: Triton 3.6 partitions the kernel only if its loads all are
        # 2-d descriptors over the rows of the whole tensor ([B, H, L] flattened: the host checks that the
        # strides allow it), the same base pointer in every program: with a base per sequence and head,
        # Triton 3.6's partitioned loop read wrong rows (h100/prefill-ws/README.md). Each ends at the last
        # row this program may read; TMA zero-fills past it.
        q_row0 = (b * (stride_qb // stride_qm) + head * (stride_qh // stride_qm)).to(tl.int32)
        q_desc = tl.make_tensor_descriptor(
            Q, shape=[q_row0 + q_len, D_BLOCK], strides=[stride_qm, 1], block_shape=[BLOCK_M, D_BLOCK]
        )
        q = q_desc.load([q_row0 + m0, 0])
    else:
        q_ptrs = Q + b * stride_qb + head * stride_qh + rows64[:, None] * stride_qm + d[None, :] * stride_qd
        if D_BLOCK == HEAD_DIM:
            q = tl.load(q_ptrs, mask=(rows < q_len)[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=(rows < q_len)[:, None] & d_ok[None, :], other=0.0)

    # Key ranges: [0, full_hi) is visible to every row of the block; [full_hi, diag_hi) needs masks.
    shift = end - qlen  # query i sees keys <= shift + i
    last_visible = shift + rows
    block_live = m0 < qlen
    if CAUSAL:
        first_row_last = tl.maximum(shift + m0 + 1, 0)
        full_hi = tl.minimum(first_row_last // BLOCK_N * BLOCK_N, end // BLOCK_N * BLOCK_N)
        diag_hi = tl.minimum(end, tl.maximum(shift + tl.minimum(m0 + BLOCK_M, qlen), 0))
    else:
        full_hi = end // BLOCK_N * BLOCK_N
        diag_hi = end
    full_hi = tl.where(block_live, full_hi, 0)
    diag_hi = tl.where(block_live, tl.maximum(diag_hi, full_hi), 0)

    offs_n = tl.arange(0, BLOCK_N)
    k_row0, v_row0 = 0, 0  # TMA row coordinates of this sequence's and head's first key (WARP_SPEC)
    if WARP_SPEC:  # K/V descriptors end at this sequence's valid keys (kv_lens served: never read past)
        k_row0 = (b * (stride_kb // stride_kn) + kv_head * (stride_kh // stride_kn)).to(tl.int32)
        v_row0 = (b * (stride_vb // stride_vn) + kv_head * (stride_vh // stride_vn)).to(tl.int32)
        k_src = tl.make_tensor_descriptor(
            K, shape=[tl.maximum(k_row0 + end, 1), D_BLOCK], strides=[stride_kn, 1],
            block_shape=[BLOCK_N, D_BLOCK],
        )  # fmt: skip
        v_src = tl.make_tensor_descriptor(
            V, shape=[tl.maximum(v_row0 + end, 1), D_BLOCK], strides=[stride_vn, 1],
            block_shape=[BLOCK_N, D_BLOCK],
        )  # fmt: skip
        k_diag, v_diag = k_src, v_src
    elif USE_TMA:  # K and V are host-side descriptors of [B, Hkv, Lkv, D]
        k_src, v_src, k_diag, v_diag = K, V, K, V
    else:
        k_src = K + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + d[None, :] * stride_kd
        v_src = V + b * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + d[None, :] * stride_vd
        k_diag = k_src + full_hi.to(tl.int64) * stride_kn
        v_diag = v_src + full_hi.to(tl.int64) * stride_vn
    mask_ptrs = Mask
    if MASK_KIND != 0:
        mask_rows = tl.minimum(rows, q_len - 1).to(tl.int64)  # rows past q_len are never stored
        mask_ptrs = (Mask + b * stride_mb + head * stride_mh + mask_rows[:, None] * stride_mm
                     + tl.arange(0, BLOCK_N)[None, :] * stride_mn)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    pad_d: tl.constexpr = D_BLOCK != HEAD_DIM
    if WARP_SPEC:  # one loop, masked throughout: Triton 3.6 partitions a kernel of one loop only
        acc, l_i, m_i = _attn_stage(
            acc, l_i, m_i, q, k_src, v_src, mask_ptrs, b32, kvh32, k_row0, v_row0, d_ok, last_visible, 0,
            diag_hi, end, stride_kn, stride_vn, stride_mn, scale_log2,
            BLOCK_N, D_BLOCK, False, CAUSAL, MASK_KIND, pad_d, USE_TMA, FP32_DOT, True,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _attn_stage(
            acc, l_i, m_i, q, k_src, v_src, mask_ptrs, b32, kvh32, 0, 0, d_ok, last_visible, 0, full_hi, end,
            stride_kn, stride_vn, stride_mn, scale_log2,
            BLOCK_N, D_BLOCK, False, CAUSAL, MASK_KIND, pad_d, USE_TMA, FP32_DOT, False,
        )  # fmt: skip
        if MASK_KIND != 0:
            mask_ptrs += full_hi.to(tl.int64) * stride_mn
        acc, l_i, m_i = _attn_stage(
            acc, l_i, m_i, q, k_diag, v_diag, mask_ptrs, b32, kvh32, 0, 0, d_ok, last_visible, full_hi,
            diag_hi, end, stride_kn, stride_vn, stride_mn, scale_log2,
            BLOCK_N, D_BLOCK, True, CAUSAL, MASK_KIND, pad_d, USE_TMA, FP32_DOT, False,
        )  # fmt: skip

    # Rows with no visible key (l == 0) and padded rows (>= q_lens[b]) are written as 0.
    out = acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None]  # one division a row, not an element
    out = tl.where((rows < qlen)[:, None], out, 0.0)
    o_ptrs = Out + b * stride_ob + head * stride_oh + rows64[:, None] * stride_om + d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows < q_len)[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------------------
# Host side: validation, launch parameters, launch.


def _check_mask(attn_mask, q, kv_len: int) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask dtype {attn_mask.dtype} is not supported; accepted: bool or float")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    batch, num_heads, q_len = q.shape[:3]
    target = (batch, num_heads, q_len, kv_len)
    fits = attn_mask.dim() <= 4 and all(
        size in (1, want) for size, want in zip(reversed(attn_mask.shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lkv]={target}"
        )


def _check_inputs(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, out) -> float:
    """Raise a clear error for unsupported input; return the softmax scale to use."""
    check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[3]} is not supported {SUPPORTED_HEAD_DIMS}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q_len={q.shape[2]} exceeds kv_len={k.shape[2]}: the new tokens must be in the key/value tensors"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r} must be True or False")
    scale = resolve_scale(scale, q.shape[3])
    check_lengths("kv_lens", kv_lens, q.shape[0], q.device)
    check_lengths("q_lens", q_lens, q.shape[0], q.device)
    _check_mask(attn_mask, q, k.shape[2])
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")  # fmt: skip
    return scale


def _size_label(n: int) -> str:
    """Smallest power of two >= n, as '512' or '4k'."""
    p = triton.next_power_of_2(max(n, 1))
    return f"{p // 1024}k" if p >= 1024 else str(p)


def prefill_bucket(
    batch: int,
    num_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype,
    has_kv_lens: bool = False,
    has_q_lens: bool = False,
    has_mask: bool = False,
) -> str:
    """Shape bucket of the tuning table: head_dim, query rows in the grid (B*Hq*Lq), key length, and how torch
    would have to run it (its speed, and so the measured speed-up, differs).

    e.g. 'd128-rows512k-kv2k'; suffixes '-chunk' (Lq < Lkv, against a cache), '-lens' (kv_lens/q_lens: a
    padded batch), '-mask' (attn_mask); fp32 inputs get their own buckets ('fp32-d128-...').
    """
    prefix = "fp32-" if dtype == torch.float32 else ""
    suffix = "-chunk" if q_len < kv_len else ""
    suffix += "-lens" if has_kv_lens or has_q_lens else ""
    suffix += "-mask" if has_mask else ""
    return f"{prefix}d{head_dim}-rows{_size_label(batch * num_heads * q_len)}-kv{_size_label(kv_len)}{suffix}"


def heuristic_params(batch: int, num_heads: int, q_len: int, head_dim: int, dtype, device) -> dict:
    """Launch parameters when the tuning table has no entry: 128x64 tiles, 8 warps; smaller where the grid
    would not fill the GPU or the tiles would not fit in shared memory (fp32, head_dim 256)."""
    d_block = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if d_block >= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if batch * num_heads * triton.cdiv(q_len, 128) < tuning.sm_count(device):
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def launch_params(q, k, *, has_lengths: bool = False, has_mask: bool = False) -> dict:
    """Tuned parameters for this shape on this GPU; a padded or masked call without an entry of its own takes
    the unpadded shape's; else the heuristic."""
    batch, num_heads, q_len, head_dim = q.shape
    shape = (batch, num_heads, q_len, k.shape[2], head_dim, q.dtype)
    params = tuning.launch_params("prefill", q.device, prefill_bucket(*shape, has_lengths, False, has_mask))
    if params is None and (has_lengths or has_mask):
        params = tuning.launch_params("prefill", q.device, prefill_bucket(*shape))
    return params or heuristic_params(batch, num_heads, q_len, head_dim, q.dtype, q.device)


# The warp-specialized tiles (BLOCK_M, BLOCK_N, num_stages) measured right on the H100 (4 warps asked for, 12
# run): 64-key tiles and 3 stages returned NaN or wrong rows there (h100/prefill-ws/README.md).
WS_TILES = ((128, 128, 2),)


def warp_spec_supported(q, k, v, attn_mask, params: dict) -> bool:
    """The warp-specialized launch takes this call with these launch parameters (`params["ws"]` asked for):
    tiles in WS_TILES with 4 warps, Q, K and V readable through TMA, K and V as rows of one 2-d tensor each
    (`rows_flatten`; a Q that is not, such as transformers' heads interleaved in a row, is copied), a Hopper
    GPU (Triton 3.6 partitions for sm_90 only), a power-of-two head_dim, no attn_mask."""
    tiles = (params["BLOCK_M"], params["BLOCK_N"], params["num_stages"])
    if tiles not in WS_TILES or params["num_warps"] != 4:
        return False
    if attn_mask is not None or q.shape[3] != triton.next_power_of_2(q.shape[3]):
        return False
    if not (rows_flatten(k) and rows_flatten(v)):
        return False
    return tma_supported(q, k, v) and torch.cuda.get_device_capability(q.device)[0] == 9


def gluon_supported(q, k, v, attn_mask, params: dict) -> bool:
    """The Gluon launch (kernels/prefill_gluon.py) takes this call with these launch parameters: its import
    worked and `prefill_gluon.supported` agrees (sm_90, fp16/bf16, head_dim 64/128, no attn_mask, TMA-readable
    strides, a schedule it has)."""
    return prefill_gluon is not None and prefill_gluon.supported(q, k, v, attn_mask, params)


def rows_flatten(t: torch.Tensor) -> bool:
    """`t` `[B, H, L, D]` reads as rows of one `[rows, D]` tensor with row stride `t.stride(2)`: the batch and
    head strides are whole rows, and every row index (int32 in a TMA coordinate) stays below 2^31."""
    b, h, n, _ = t.shape
    sb, sh, sn, _ = t.stride()
    if sn <= 0 or sb % sn or sh % sn:
        return False
    return (b - 1) * (sb // sn) + (h - 1) * (sh // sn) + n < 2**31


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the TMA descriptors a kernel makes on the device (Triton asks per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-made descriptors need Triton's allocator; one the caller set is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _prefill_into(q, k, v, out, scale: float, causal: bool, kv_lens, q_lens, attn_mask, params=None) -> None:
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return
    has_lengths = kv_lens is not None or q_lens is not None
    p = params or launch_params(q, k, has_lengths=has_lengths, has_mask=attn_mask is not None)
    if p.get("gluon"):
        if gluon_supported(q, k, v, attn_mask, p):
            prefill_gluon.prefill_into(q, k, v, out, scale, causal, kv_lens, q_lens, p)
            return
        p = heuristic_params(batch, num_heads, q_len, head_dim, q.dtype, q.device)  # its tiles need Gluon
    warp_spec = bool(p.get("ws")) and warp_spec_supported(q, k, v, attn_mask, p)
    if p.get("ws") and not warp_spec:  # its 4-warp tiles would spill without the partitions
        p = heuristic_params(batch, num_heads, q_len, head_dim, q.dtype, q.device)
    if warp_spec:
        _ensure_allocator()
        q = q if rows_flatten(q) else q.contiguous()  # a copy of Q (its cost not yet timed)
    k_strides, v_strides = k.stride(), v.stride()
    d_block = triton.next_power_of_2(head_dim)
    use_tma = not warp_spec and bool(p.get("tma")) and tma_supported(k, v)
    if use_tma:
        block = [1, 1, p["BLOCK_N"], d_block]
        k, v = descriptor(k, block), descriptor(v, block)
    mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)  # q: any pointer, unread without a mask
    if attn_mask is not None:
        mask = attn_mask.expand(batch, num_heads, q_len, kv_len)
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
        mask = mask.view(torch.uint8) if mask_kind == MASK_BOOL else mask
        mask_strides = mask.stride()
    kv_lens = kv_lens.contiguous() if kv_lens is not None else None
    q_lens = q_lens.contiguous() if q_lens is not None else None
    grid = (batch * num_heads, triton.cdiv(q_len, p["BLOCK_M"]))
    _prefill_kernel[grid](
        q, k, v, out, kv_lens if kv_lens is not None else q, q_lens if q_lens is not None else q, mask,
        *q.stride(), *k_strides, *v_strides, *out.stride(), *mask_strides,
        scale * LOG2E, q_len, kv_len, num_heads,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_BLOCK=d_block,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], CAUSAL=causal,
        HAS_KV_LENS=kv_lens is not None, HAS_Q_LENS=q_lens is not None, MASK_KIND=mask_kind,
        USE_TMA=use_tma, FP32_DOT=fp32_dot(q.dtype), WARP_SPEC=warp_spec, num_warps=p["num_warps"],
        num_stages=p["num_stages"],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile; capturable in CUDA graphs) and the public function.


@torch.library.custom_op("attnforge::prefill_attention", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                kv_lens: torch.Tensor | None, q_lens: torch.Tensor | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _prefill_into(q, k, v, out, scale, causal, kv_lens, q_lens, attn_mask)
    return out


@_prefill_op.register_fake
def _(q, k, v, scale, causal, kv_lens, q_lens, attn_mask):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnforge::prefill_attention_out", mutates_args=("out",))
def _prefill_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                    kv_lens: torch.Tensor | None, q_lens: torch.Tensor | None,
                    attn_mask: torch.Tensor | None, out: torch.Tensor) -> None:  # fmt: skip
    _prefill_into(q, k, v, out, scale, causal, kv_lens, q_lens, attn_mask)


@_prefill_out_op.register_fake
def _(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, out):
    return None


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a prompt (or a chunk of one) against keys/values, GQA/MQA/MHA native.

    Args:
        q: `[B, Hq, Lq, D]`, any strides.
        k, v: `[B, Hkv, Lkv, D]`, any strides (e.g. a slice of a preallocated cache); Hq % Hkv == 0 and
            Lq <= Lkv.
        scale: softmax scale (> 0), default 1/sqrt(D).
        causal: bottom-right aligned: query i sees keys `<= Lkv - Lq + i`; with `kv_lens`/`q_lens`,
            keys `<= kv_lens[b] - q_lens[b] + i` (the new tokens are the last valid positions).
        kv_lens: int32/int64 `[B]` valid keys per sequence; keys at or beyond it are never read. Values are
            clamped to [0, Lkv] on the device (no host sync): above Lkv acts as Lkv, below 0 as 0 (no key
            is visible, so the sequence's rows are 0).
        q_lens: int32/int64 `[B]` valid queries per sequence; rows at or beyond it are written as 0. Values
            are clamped to [0, Lq] on the device: above Lq acts as Lq, below 0 as 0 (every row is 0).
        attn_mask: bool (True = attend) or additive float mask broadcastable to `[B, Hq|1, Lq, Lkv]`,
            combined with `causal`, `kv_lens` and `q_lens`.
        out: optional `[B, Hq, Lq, D]` buffer written in place (no allocation, for CUDA-graph capture).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (`out` when given); rows that see no key are 0, never NaN.
        D in 64, 80, 96, 128, 256; fp16/bf16 (fp32 on a slower, exact path).
    """
    scale = _check_inputs(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, out)
    if out is None:
        return _prefill_op(q, k, v, scale, causal, kv_lens, q_lens, attn_mask)
    _prefill_out_op(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, out)
    return out
