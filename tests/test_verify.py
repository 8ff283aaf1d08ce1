"""The protocol must pass correct kernels and reject each planted wrong one for the right reason."""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from attnforge import verify
from attnforge.config import AttentionConfig
from attnforge.kernels import reference
from attnforge.verify import check, reference_attention

# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)

SHAPES = [
    config_of(2, 4, 2, 1, 65, 16),  # GQA decode
    config_of(1, 6, 1, 7, 63, 16),  # MQA, multi-token decode, odd lengths
    config_of(3, 4, 4, 1, 1000, 8),  # MHA, long-ish, batch 3
    config_of(1, 2, 1, 1, 1, 16),  # a single key
]


def _sdpa64(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kwargs)


@pytest.mark.parametrize(
    "shape", [config_of(2, 8, 2, 5, 5, 16), config_of(1, 4, 4, 33, 33, 8), config_of(2, 6, 3, 1, 17, 32)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_oracle_matches_torch_sdpa_float64(shape, causal):
    case = verify.random_case(dataclasses.replace(shape, dtype=torch.float64))
    causal = causal and shape.seq_len == shape.kv_len  # torch's is_causal is top-left; equal only when square
    expected = _sdpa64(case.q, case.k, case.v, is_causal=causal)
    torch.testing.assert_close(reference_attention(case.q, case.k, case.v, causal=causal), expected)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_oracle_matches_torch_sdpa_with_masks(mask_kind):
    case = verify.random_case(config_of(2, 4, 2, 9, 31, 16, dtype=torch.float64))
    keep = torch.rand(2, 1, 9, 31) > 0.3
    keep[..., 0] = True  # torch returns NaN for fully masked rows; the oracle returns 0
    mask = (
        keep
        if mask_kind == "bool"
        else torch.randn(2, 4, 9, 31, dtype=torch.float64).masked_fill(~keep, -math.inf)
    )
    expected = _sdpa64(case.q, case.k, case.v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(
        reference_attention(case.q, case.k, case.v, attn_mask=mask, scale=0.3), expected
    )


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_matches_the_oracle_and_caps_logits(mask_kind, causal):
    """reference.math_attention: the path for softcapping and training dropout (transformers integration)."""
    case = verify.random_case(config_of(2, 6, 3, 5, 13, 16, dtype=torch.float64))
    keep = torch.rand(2, 1, 5, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., 0] = True
    mask = {None: None, "bool": keep, "additive": torch.zeros(2, 6, 5, 13, dtype=torch.float64)
            .masked_fill(~keep, -math.inf)}[mask_kind]  # fmt: skip
    options = dict(scale=0.3, causal=causal, attn_mask=mask)
    expected = reference_attention(case.q, case.k, case.v, **options)
    torch.testing.assert_close(reference.math_attention(case.q, case.k, case.v, **options), expected)
    q, k, v = case.q * 50, case.k.repeat_interleave(2, 1), case.v.repeat_interleave(2, 1)
    logits = 2.0 * torch.tanh(0.3 * q @ k.transpose(-1, -2) / 2.0)  # softcap 2: |logit| < 2
    visible = reference.visibility_mask(2, 5, 13, causal=causal, kv_lens=None)
    visible = keep if visible is None and mask_kind else visible & keep if mask_kind else visible
    if visible is not None:
        logits = logits.masked_fill(~visible, -math.inf)
    expected = torch.softmax(logits, dim=-1) @ v
    torch.testing.assert_close(
        reference.math_attention(case.q * 50, case.k, case.v, softcap=2.0, **options), expected
    )


def test_oracle_causal_is_bottom_right_and_honours_kv_lens():
    case = verify.random_case(config_of(2, 2, 1, 3, 10, 8, dtype=torch.float64))
    kv_lens = torch.tensor([10, 6])
    out = reference_attention(case.q, case.k, case.v, causal=True, kv_lens=kv_lens)
    for b, end in enumerate(kv_lens.tolist()):
        for i in range(3):  # query i sees keys 0 .. end - 3 + i
            last = end - 3 + i
            expected = _sdpa64(case.q[b : b + 1, :, i : i + 1], case.k[b : b + 1, :, : last + 1],
                               case.v[b : b + 1, :, : last + 1])  # fmt: skip
            torch.testing.assert_close(out[b : b + 1, :, i : i + 1], expected)


def test_oracle_q_lens_zero_padded_rows_and_fully_masked_rows():
    case = verify.random_case(config_of(2, 2, 2, 4, 8, 8, dtype=torch.float64))
    out = reference_attention(case.q, case.k, case.v, causal=True, q_lens=torch.tensor([4, 2]))
    assert torch.all(out[1, :, 2:] == 0) and torch.all(out[1, :, :2] != 0)
    none_visible = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    assert torch.all(reference_attention(case.q, case.k, case.v, attn_mask=none_visible) == 0)


def test_oracle_never_reads_padding():
    case = verify.poisoned_case(config_of(3, 4, 2, 2, 40, 16, causal=True))
    assert not torch.isfinite(case.k).all(), "the poisoned case must actually hold NaN/Inf"
    assert torch.isfinite(case.reference()).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_correct_implementation_passes_every_case(shape, dtype):
    causal = shape.seq_len > 1
    for case in verify.protocol_cases(dataclasses.replace(shape, dtype=dtype, causal=causal)):
        report = check(reference.sdpa_per_sequence, case)
        assert report.passed, str(report)


@pytest.mark.parametrize("q_len", [1, 7, None])
def test_odd_shapes_cover_the_protocol_lengths(q_len):
    shapes = verify.odd_shapes(4, 2, 16, q_len=q_len, max_len=1000)
    assert [s.kv_len for s in shapes] == [1, 7, 63, 65, 1000]
    assert all(s.seq_len == (s.kv_len if q_len is None else min(q_len, s.kv_len)) for s in shapes)
    for shape in shapes[:4]:
        case = verify.poisoned_case(dataclasses.replace(shape, causal=True))
        assert check(reference.sdpa_per_sequence, case).passed


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.kv_len > 1], ids=str)
def test_planted_wrong_kernels_fail_for_the_right_reason(shape):
    """Each planted bug is rejected, by the cases that probe what it gets wrong."""
    causal = True
    cases = {c.name: c for c in verify.protocol_cases(dataclasses.replace(shape, causal=causal))}
    bugs = verify.PLANTED_BUGS

    zeros = check(bugs["returns-zeros"], cases["random"])
    assert not zeros.passed and zeros.max_rel_l2 == pytest.approx(1.0)

    dropped = check(bugs["drops-last-10%-of-keys"], cases["needle-last"])
    assert not dropped.passed and dropped.max_rel_l2 > 0.5, str(dropped)

    ignored = check(bugs["ignores-kv_lens"], cases["poisoned"])
    assert not ignored.passed and ignored.nonfinite > 0 and "non-finite" in ignored.reason
    assert check(bugs["ignores-kv_lens"], cases["random"]).passed  # only the kv_lens case can catch it

    if shape.seq_len > 1:
        top_left = check(bugs["top-left-causal"], cases["random"])
        assert not top_left.passed and top_left.max_rel_l2 > 0.1, str(top_left)


def test_nan_prefilled_out_catches_unwritten_rows():
    def writes_half(q, k, v, *, out, causal=False, **_):
        ref = reference_attention(q, k, v, causal=causal).to(q.dtype)
        out[:, :, : q.shape[2] // 2] = ref[:, :, : q.shape[2] // 2]
        return out

    report = check(writes_half, verify.random_case(config_of(1, 2, 2, 6, 6, 8)))
    assert not report.passed and report.nonfinite > 0


def test_check_reports_exceptions_shape_and_dtype_errors():
    case = verify.random_case(config_of(1, 2, 1, 1, 9, 8))

    def raises(q, k, v, **_):
        raise RuntimeError("kernel exploded")

    assert "raised RuntimeError: kernel exploded" in check(raises, case).reason
    assert "output shape" in check(lambda q, k, v, **_: q[:, :1], case).reason
    assert "output dtype" in check(lambda q, k, v, **_: q.double(), case).reason


def test_check_rejects_a_fresh_tensor_when_out_is_given():
    def ignores_out(q, k, v, *, out, causal=False, **_):
        return reference_attention(q, k, v, causal=causal).to(q.dtype)

    assert (
        "instead of writing into out="
        in check(ignores_out, verify.random_case(config_of(1, 2, 1, 1, 9, 8))).reason
    )


def test_metric_is_per_slice_not_global():
    """A wrong slice fails even when the tensor-wide error is small: the protocol's reason for the metric."""
    case = verify.random_case(config_of(4, 8, 8, 1, 64, 16))

    def one_bad_head(q, k, v, **kwargs):
        out = reference_attention(q, k, v, **kwargs).to(q.dtype)
        out[3, 7] *= 1.05
        return out

    report = check(one_bad_head, case)
    assert not report.passed and report.worst_slice == (3, 7)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_tolerances(dtype, tol):
    assert verify.tolerance_for(dtype) == tol
    assert verify.tolerance_for(torch.float32, tf32=True) == 1e-3


def test_generators_draw_fresh_inputs_and_odd_layouts():
    shape = config_of(2, 4, 2, 3, 65, 16)
    a, b = verify.random_case(shape), verify.random_case(shape)
    assert not torch.equal(a.q, b.q)
    strided = verify.strided_case(shape)
    assert not strided.q.is_contiguous() and not strided.k.is_contiguous() and not strided.v.is_contiguous()
    assert verify.large_logits_case(shape).q.abs().max() > 10


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: verify.tolerance_for(torch.int32), ValueError, r"no tolerance for dtype=torch.int32"),
        (lambda: config_of(1, 2, 1, 9, 8, 16), ValueError, r"seq_len=9 exceeds kv_len=8"),
        (
            lambda: config_of(1, 6, 4, 1, 8, 16),
            ValueError,
            r"num_heads=6 is not divisible by num_kv_heads=4",
        ),
        (
            lambda: verify.protocol_cases(config_of(1, 2, 1, 1, 8, 16), kinds=["bogus"]),
            ValueError,
            r"unknown case kinds",
        ),
    ],
)
def test_bad_protocol_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kv_lens": torch.tensor([9])}, ValueError, r"kv_lens values must lie in \[0, 8\], got \[9\]"),
        ({"kv_lens": torch.tensor([1, 2])}, ValueError, r"kv_lens must have shape \[B\]=\(1,\)"),
        ({"kv_lens": torch.tensor([1.0])}, TypeError, r"kv_lens must be an integer tensor"),
        (
            {"attn_mask": torch.ones(3, 3, dtype=torch.bool)},
            ValueError,
            r"does not broadcast to \[B, Hq, Lq, Lkv\]",
        ),
    ],
)
def test_oracle_rejects_bad_options(kwargs, error, message):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(error, match=message):
        reference_attention(q, k, k, **kwargs)
