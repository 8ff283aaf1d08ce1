"""Attention implementations on MLX, and the correctness protocol applied to them.

- `fast_attention`: `mx.fast.scaled_dot_product_attention`, MLX's own kernel: the baseline every call falls
  back to (attnforge must never make an mlx-lm user slower).
- `composed_attention`: GQA-aware attention from plain MLX ops: queries reshaped to `(B, Hkv, G, L, D)`,
  keys and values never repeated.
- `metal_decode_attention`: a custom Metal kernel (`mx.fast.metal_kernel`) for one query token against the
  cache. It can only run, and so only be verified, on a Mac with a Metal device: nothing here has run it.
- `check_mlx(fn, ...)`: the protocol of attnforge.verify (float64 oracle, per-slice relative L2, random /
  needle / large-logit inputs) for a function of MLX arrays.

Tensors follow mlx-lm's layout: queries `[B, Hq, L, D]`, keys and values `[B, Hkv, S, D]`, Hq % Hkv == 0.
A mask is None, "causal" (bottom-right aligned: the last query sees the last key), or an array that
broadcasts to `[B, Hq, L, S]`: bool (True = attend) or additive.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from attnforge import verify
from attnforge.integrations import MLX_INSTALL_HINT

try:
    import mlx.core as mx
except ImportError as error:  # pragma: no cover - exercised by hiding mlx in the tests
    raise ImportError(MLX_INSTALL_HINT) from error

# MLX dtype -> the torch dtype AttentionConfig and the protocol's tolerances are keyed by.
TORCH_DTYPES = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16, mx.float32: torch.float32}
MLX_DTYPES = {torch_dtype: mlx_dtype for mlx_dtype, torch_dtype in TORCH_DTYPES.items()}
# The protocol's inputs that make sense for MLX calls (mlx-lm passes masks, not kv_lens: no "poisoned").
MLX_CASE_KINDS = ("random", "needle", "large")
SIMD_WIDTH = 32
METAL_MAX_HEAD_DIM = 256


def fast_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask=None
) -> mx.array:
    """`mx.fast.scaled_dot_product_attention`: q `[B, Hq, L, D]`, k/v `[B, Hkv, S, D]` -> `[B, Hq, L, D]`."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def composed_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask=None
) -> mx.array:
    """GQA-aware attention from MLX ops; the G query heads of a key/value head share one read of it.

    Args:
        queries: `[B, Hq, L, D]`; keys, values: `[B, Hkv, S, D]` with Hq % Hkv == 0.
        scale: softmax scale (mlx-lm passes 1/sqrt(D) or the model's own).
        mask: None, "causal" (bottom-right aligned) or a bool/additive array broadcastable to `[B, Hq, L, S]`.

    Returns:
        `[B, Hq, L, D]` in the queries' dtype. Half-precision inputs are computed in float32 (a float32 copy
        of k and v per call): logits rounded to bfloat16 fail the protocol's large-logit cases.
    """
    batch, num_heads, q_len, head_dim = queries.shape
    num_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    out_dtype = queries.dtype
    queries, keys, values = (x.astype(mx.float32) for x in (queries, keys, values))
    grouped = (queries * scale).reshape(batch, num_kv_heads, group, q_len, head_dim)
    scores = grouped @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # [B, Hkv, G, L, S]
    mask = _grouped_mask(mask, num_heads, num_kv_heads, q_len, kv_len)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask.astype(scores.dtype)
    weights = mx.softmax(scores, axis=-1)
    out = weights @ mx.expand_dims(values, 2)  # [B, Hkv, G, L, D]
    return out.reshape(batch, num_heads, q_len, values.shape[-1]).astype(out_dtype)


def _grouped_mask(mask, num_heads: int, num_kv_heads: int, q_len: int, kv_len: int) -> mx.array | None:
    """The mask as a 5-D array that broadcasts against grouped scores `[B, Hkv, G, L, S]`."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask={mask!r} is not supported; accepted strings: 'causal'")
        query_pos = mx.arange(kv_len - q_len, kv_len)
        return query_pos[:, None] >= mx.arange(kv_len)[None]
    if mask.ndim > 4:
        raise ValueError(f"mask of shape {tuple(mask.shape)} has more than 4 dims [B, Hq, L, S]")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    if mask.shape[1] != num_heads:
        raise ValueError(f"mask of shape {tuple(mask.shape)}: dim 1 must be 1 or Hq={num_heads}")
    group = num_heads // num_kv_heads
    return mask.reshape(mask.shape[0], num_kv_heads, group, *mask.shape[2:])


# ----------------------------------------------------------------------------------------------------------
# The Metal decode kernel (runs only where mx.metal.is_available(); never run on the machines of this project)

# One threadgroup of one SIMD group (32 threads) per (batch, query head); thread `lane` holds dims
# lane, lane + 32, ... of the query and of its output row. Keys are read once per token, each logit is a
# simd_sum, and an online softmax (running max, rescaled sum) walks the cache in order.
METAL_DECODE_SOURCE = """
    uint lane = thread_position_in_threadgroup.x;
    uint row = threadgroup_position_in_grid.x;  // b * HQ + query head
    uint batch = row / HQ;
    uint kv_head = (row % HQ) / (HQ / HKV);
    int kv_len = k_shape[2];
    size_t head_offset = (size_t(batch) * HKV + kv_head) * size_t(kv_len) * D;
    const device T* q_row = q + size_t(row) * D;
    const device T* k_rows = k + head_offset;
    const device T* v_rows = v + head_offset;
    float q_part[CHUNKS];
    float acc[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) {
        uint d = lane + 32 * c;
        q_part[c] = d < D ? float(q_row[d]) * scale[0] : 0.0f;
        acc[c] = 0.0f;
    }
    float running_max = -INFINITY;
    float denom = 0.0f;
    for (int t = 0; t < kv_len; ++t) {
        float partial = 0.0f;
        for (int c = 0; c < CHUNKS; ++c) {
            uint d = lane + 32 * c;
            if (d < D) {
                partial += q_part[c] * float(k_rows[size_t(t) * D + d]);
            }
        }
        float logit = simd_sum(partial);
        float new_max = metal::max(running_max, logit);
        float correction = metal::exp(running_max - new_max);
        float weight = metal::exp(logit - new_max);
        denom = denom * correction + weight;
        for (int c = 0; c < CHUNKS; ++c) {
            uint d = lane + 32 * c;
            if (d < D) {
                acc[c] = acc[c] * correction + weight * float(v_rows[size_t(t) * D + d]);
            }
        }
        running_max = new_max;
    }
    for (int c = 0; c < CHUNKS; ++c) {
        uint d = lane + 32 * c;
        if (d < D) {
            out[size_t(row) * D + d] = T(acc[c] / denom);
        }
    }
"""

_metal_kernel = None


def metal_available() -> bool:
    """True when MLX has a Metal device (a Mac with Apple silicon); False on Linux."""
    return bool(mx.metal.is_available())


def _build_metal_kernel():
    global _metal_kernel
    if _metal_kernel is None:
        _metal_kernel = mx.fast.metal_kernel(
            name="attnforge_gqa_decode",
            input_names=["q", "k", "v", "scale"],
            output_names=["out"],
            source=METAL_DECODE_SOURCE,
        )
    return _metal_kernel


def metal_decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask=None
) -> mx.array:
    """attnforge's Metal decode kernel: one query token per head against the whole cache, GQA native.

    Unverified on this project's machines (no Metal device); on a Mac the integration verifies it against
    the float64 oracle (`check_mlx`) at first use and enables it only if every case passes. Non-contiguous
    keys/values (a slice of mlx-lm's KVCache buffer) are copied to contiguous memory first.

    Args:
        queries: `[B, Hq, 1, D]`; keys, values: `[B, Hkv, S, D]`, Hq % Hkv == 0, D <= 256.
        scale: softmax scale. mask: must be None (one query at the end of the cache sees every key).

    Returns:
        `[B, Hq, 1, D]` in the queries' dtype.
    """
    batch, num_heads, q_len, head_dim = queries.shape
    if q_len != 1 or mask is not None:
        raise ValueError(f"the Metal decode kernel takes one query and no mask, got L={q_len}, mask={mask!r}")
    if head_dim > METAL_MAX_HEAD_DIM or values.shape[-1] != head_dim:
        raise ValueError(
            f"head_dim={head_dim} (value dim {values.shape[-1]}) is not supported (<= 256, equal)"
        )
    outputs = _build_metal_kernel()(
        inputs=[queries, keys, values, mx.array([scale], dtype=mx.float32)],
        template=[
            ("T", queries.dtype),
            ("D", head_dim),
            ("HQ", num_heads),
            ("HKV", keys.shape[1]),
            ("CHUNKS", math.ceil(head_dim / SIMD_WIDTH)),
        ],  # fmt: skip
        grid=(batch * num_heads * SIMD_WIDTH, 1, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[queries.dtype],
    )
    return outputs[0]


# ----------------------------------------------------------------------------------------------------------
# The correctness protocol for MLX functions


def to_mlx(tensor: torch.Tensor) -> mx.array:
    """A torch tensor as an MLX array of the same dtype (bfloat16 goes through float32: numpy has none)."""
    if tensor.dtype not in MLX_DTYPES:
        raise TypeError(f"dtype={tensor.dtype} has no MLX counterpart; accepted: {list(MLX_DTYPES)}")
    array = mx.array(tensor.detach().cpu().float().numpy())
    return array.astype(MLX_DTYPES[tensor.dtype])


def to_torch(array: mx.array) -> torch.Tensor:
    """An MLX array as a torch tensor of the same dtype (CPU)."""
    if array.dtype not in TORCH_DTYPES:
        raise TypeError(f"dtype={array.dtype} has no torch counterpart; accepted: {list(TORCH_DTYPES)}")
    return torch.from_numpy(np.array(array.astype(mx.float32))).to(TORCH_DTYPES[array.dtype])


def torch_adapter(fn: Callable) -> Callable:
    """`fn(q, k, v, *, scale, mask)` on MLX arrays as a function `verify.check` can judge (torch in, out)."""

    def run(q, k, v, *, causal=False, scale=None, attn_mask=None):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        mask = "causal" if causal else (None if attn_mask is None else to_mlx_mask(attn_mask))
        out = fn(to_mlx(q), to_mlx(k), to_mlx(v), scale=scale, mask=mask)
        mx.eval(out)
        return to_torch(out)

    return run


def to_mlx_mask(mask: torch.Tensor) -> mx.array:
    """A bool or float torch mask as an MLX array (bool stays bool)."""
    array = mx.array(mask.detach().cpu().numpy() if mask.dtype == torch.bool else mask.float().numpy())
    return array


def check_mlx(
    fn: Callable,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: mx.Dtype = mx.float32,
    q_len: int | None = 1,
    batch: int = 2,
    max_len: int = 1000,
    causal: bool = False,
    kinds: tuple[str, ...] = MLX_CASE_KINDS,
) -> list[verify.Report]:
    """Judge `fn(q, k, v, *, scale, mask)` (MLX arrays) by attnforge's protocol: float64 oracle, per-slice
    relative L2 with the tolerance of `dtype`, fresh random / needle / large-logit inputs at the odd lengths
    (1, 7, 63, 65, 1000) up to `max_len`.

    Args:
        num_heads, num_kv_heads, head_dim: Hq, Hkv, D of every case; q_len: Lq (None: Lq = Lkv).
        dtype: mx.float16, mx.bfloat16 or mx.float32.

    Returns:
        one verify.Report per case (`report.passed`, `report.reason`).
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; accepted: {list(TORCH_DTYPES)}")
    shapes = verify.odd_shapes(num_heads, num_kv_heads, head_dim, batch=batch, q_len=q_len, max_len=max_len,
                               dtype=TORCH_DTYPES[dtype], causal=causal)  # fmt: skip
    run = torch_adapter(fn)
    reports = []
    for shape in shapes:
        for case in verify.protocol_cases(shape, kinds=kinds):
            reports.append(verify.check(run, case))
    return reports
