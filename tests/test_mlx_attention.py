"""attnforge's MLX attention implementations under the correctness protocol (float64 oracle), on MLX's CPU."""

import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
from attnforge import verify  # noqa: E402
from attnforge.integrations import mlx_attention as impl  # noqa: E402

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# (Hq, Hkv, D): GQA 3:1 (SmolLM2), MQA, MHA, GQA 4:1 at head_dim 128 and 80.
HEADS = [(9, 3, 64), (4, 1, 64), (4, 4, 128), (8, 2, 80)]


def _failures(reports):
    return [str(report) for report in reports if not report.passed]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_composed_attention_passes_the_protocol_for_decode(dtype, heads):
    num_heads, num_kv_heads, head_dim = heads
    reports = impl.check_mlx(impl.composed_attention, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, dtype=dtype, q_len=1)  # fmt: skip
    assert len(reports) == 15 and not _failures(reports)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len", [None, 7])  # fresh prefill (Lq = Lkv); 7 new tokens against a cache
def test_composed_attention_passes_the_protocol_causal(dtype, q_len):
    reports = impl.check_mlx(impl.composed_attention, num_heads=6, num_kv_heads=2, head_dim=64, dtype=dtype,
                             q_len=q_len, causal=True, max_len=65)  # fmt: skip
    assert not _failures(reports)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("mask_heads", [1, 6])
def test_composed_attention_takes_bool_and_additive_masks(mask_dtype, mask_heads):
    q, k, v = torch.randn(2, 6, 5, 64), torch.randn(2, 2, 33, 64), torch.randn(2, 2, 33, 64)
    keep = torch.rand(2, mask_heads, 5, 33) > 0.3
    keep[..., -1] = True  # every row sees at least one key
    mask = keep if mask_dtype == torch.bool else torch.where(keep, 0.0, -1e9) + torch.randn(keep.shape)
    expected = verify.reference_attention(q, k, v, attn_mask=mask)
    out = impl.torch_adapter(impl.composed_attention)(q, k, v, attn_mask=mask)
    assert float(verify.relative_l2_per_slice(out, expected).max()) < 1e-5


def test_the_baseline_passes_the_protocol_in_float32():
    reports = impl.check_mlx(impl.fast_attention, num_heads=9, num_kv_heads=3, head_dim=64, q_len=1)
    assert not _failures(reports)


def _skips_last_key(queries, keys, values, *, scale, mask=None):
    return impl.composed_attention(queries, keys[:, :, :-1], values[:, :, :-1], scale=scale)


def _repeats_first_kv_head(queries, keys, values, *, scale, mask=None):
    """GQA done wrong: every query head reads key/value head 0."""
    first = (keys[:, :1], values[:, :1])
    return impl.composed_attention(queries, *first, scale=scale, mask=mask)


def _top_left_causal(queries, keys, values, *, scale, mask=None):
    q_len, kv_len = queries.shape[2], keys.shape[2]
    top_left = mx.arange(q_len)[:, None] >= mx.arange(kv_len)[None]
    return impl.composed_attention(queries, keys, values, scale=scale, mask=top_left if mask else None)


@pytest.mark.parametrize("wrong", [_skips_last_key, _repeats_first_kv_head, _top_left_causal])
def test_the_protocol_rejects_wrong_mlx_implementations(wrong):
    reports = impl.check_mlx(
        wrong, num_heads=4, num_kv_heads=2, head_dim=64, q_len=7, causal=True, max_len=65
    )
    assert _failures(reports)


def test_mask_errors_name_the_value_and_the_accepted_ones():
    q, k = mx.zeros((1, 4, 2, 64)), mx.zeros((1, 2, 5, 64))
    with pytest.raises(ValueError, match=r"mask='sliding' is not supported; accepted strings: 'causal'"):
        impl.composed_attention(q, k, k, scale=0.125, mask="sliding")
    with pytest.raises(ValueError, match=r"mask of shape \(1, 3, 2, 5\): dim 1 must be 1 or Hq=4"):
        impl.composed_attention(q, k, k, scale=0.125, mask=mx.ones((1, 3, 2, 5), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"has more than 4 dims"):
        impl.composed_attention(q, k, k, scale=0.125, mask=mx.ones((1, 1, 1, 2, 5), dtype=mx.bool_))


def test_metal_kernel_refuses_what_it_does_not_serve_before_launching():
    k = mx.zeros((1, 2, 5, 64))
    with pytest.raises(ValueError, match=r"one query and no mask, got L=2, mask=None"):
        impl.metal_decode_attention(mx.zeros((1, 4, 2, 64)), k, k, scale=0.125)
    with pytest.raises(ValueError, match=r"one query and no mask, got L=1, mask='causal'"):
        impl.metal_decode_attention(mx.zeros((1, 4, 1, 64)), k, k, scale=0.125, mask="causal")
    big = mx.zeros((1, 2, 5, 512))
    with pytest.raises(ValueError, match=r"head_dim=512 \(value dim 512\) is not supported"):
        impl.metal_decode_attention(mx.zeros((1, 4, 1, 512)), big, big, scale=0.125)


def test_metal_kernel_source_serves_gqa_without_repeating_keys():
    # What can be checked without a Metal device; the kernel itself runs only on a Mac (test_mlx_lm.py).
    source = impl.METAL_DECODE_SOURCE
    assert "(row % HQ) / (HQ / HKV)" in source and "simd_sum" in source and "running_max" in source


def test_conversions_between_torch_and_mlx_keep_dtype_and_values():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tensor = torch.randn(2, 3, dtype=torch.float32).to(dtype)
        back = impl.to_torch(impl.to_mlx(tensor))
        assert back.dtype == dtype and torch.equal(back, tensor)
    with pytest.raises(TypeError, match=r"dtype=torch.float64 has no MLX counterpart; accepted"):
        impl.to_mlx(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"dtype=mlx.core.int32 has no torch counterpart; accepted"):
        impl.to_torch(mx.zeros(2, dtype=mx.int32))
    with pytest.raises(ValueError, match=r"dtype=mlx.core.int8 is not supported; accepted"):
        impl.check_mlx(impl.fast_attention, num_heads=2, num_kv_heads=1, head_dim=64, dtype=mx.int8)
