"""prefill_attention against the float64 oracle (CPU, TRITON_INTERPRET=1, small shapes): the protocol cases,
odd sizes, every head_dim and dtype, GQA/MQA/MHA, chunked prefill, padding, masks, and each input error."""

import dataclasses
import functools
import math

import pytest
import torch

from attnforge import verify
from attnforge.config import AttentionConfig
from attnforge.kernels import prefill as prefill_mod
from attnforge.kernels.prefill import prefill_attention
from attnforge.verify import check

# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# CPU through the interpreter (CI); the same tests on a GPU where there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_passes(case, fn=prefill_attention):
    report = check(fn, case)
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "shape",
    [
        config_of(2, 4, 2, 65, 65, 64),  # GQA, odd length past one 64-row block
        config_of(1, 3, 1, 7, 63, 96),  # MQA, chunk of 7 against a cache
        config_of(2, 2, 2, 1, 1, 80),  # MHA, a single token
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_protocol_cases_causal(shape, dtype):
    for case in verify.protocol_cases(dataclasses.replace(shape, dtype=dtype, causal=True), device=DEVICE):
        _assert_passes(case)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_every_head_dim(head_dim):
    for causal in (True, False):
        case = verify.random_case(
            config_of(1, 2, 1, 33, 70, head_dim, dtype=torch.bfloat16, causal=causal), device=DEVICE
        )
        _assert_passes(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_causal_and_poisoned_padding(dtype):
    for case in verify.protocol_cases(
        config_of(2, 4, 1, 9, 130, 64, dtype=dtype, causal=False),
        device=DEVICE,
        kinds=("random", "needle", "poisoned"),
    ):
        _assert_passes(case)


@pytest.mark.parametrize("block", [(32, 32), (64, 32), (32, 64)])
def test_block_boundaries_with_other_tiles(block, monkeypatch):
    """Diagonal and full blocks split differently for other tile shapes (as the tuning table may pick)."""
    params = {"BLOCK_M": block[0], "BLOCK_N": block[1], "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    for shape in (config_of(1, 2, 1, 65, 65, 64), config_of(2, 2, 2, 31, 97, 64)):
        kinds = ("needle", "poisoned")
        for case in verify.protocol_cases(
            dataclasses.replace(shape, dtype=torch.float16, causal=True), device=DEVICE, kinds=kinds
        ):
            _assert_passes(case)


def test_tma_load_path(monkeypatch):
    """The TMA descriptor path (chosen on Hopper GPUs by the tuning table) computes the same function; the
    interpreter runs it when the guard is lifted. Padding past kv_lens is read there and must be zeroed."""
    monkeypatch.setattr(prefill_mod, "tma_supported", lambda k, v: True)
    params = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "tma": True}
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    for shape in (config_of(2, 4, 2, 65, 65, 64), config_of(1, 2, 1, 7, 70, 80)):
        kinds = ("random", "needle", "poisoned")
        for case in verify.protocol_cases(
            dataclasses.replace(shape, dtype=torch.float16, causal=True), device=DEVICE, kinds=kinds
        ):
            _assert_passes(case)


def test_tma_guard_rejects_unaligned_and_cpu_tensors():
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    assert not prefill_mod.tma_supported(k, k)


def test_padded_queries_and_keys_bottom_right():
    """q_lens/kv_lens: query i sees keys <= kv_lens[b] - q_lens[b] + i; rows past q_lens[b] are 0."""
    shape = config_of(3, 4, 2, 20, 50, 64)
    case = verify.random_case(dataclasses.replace(shape, causal=True, dtype=torch.float16), device=DEVICE)
    case.kv_lens = torch.tensor([50, 31, 20], dtype=torch.int32, device=DEVICE)
    case.q_lens = torch.tensor([20, 5, 0], dtype=torch.int64, device=DEVICE)
    for bi, end in enumerate(case.kv_lens.tolist()):
        case.k[bi, :, end:] = math.nan
        case.v[bi, :, end:] = math.inf
    _assert_passes(case)
    out = prefill_attention(case.q, case.k, case.v, kv_lens=case.kv_lens, q_lens=case.q_lens)
    assert torch.all(out[1, :, 5:] == 0) and torch.all(out[2] == 0)


def test_q_lens_alone_and_kv_shorter_than_queries_gives_zero_rows():
    """kv_lens[b] < q_lens[b]: the first queries see no key at all and come out 0, never NaN."""
    case = verify.random_case(config_of(2, 2, 1, 16, 16, 64, dtype=torch.float32, causal=True), device=DEVICE)
    case.q_lens = torch.tensor([16, 9], device=DEVICE)
    _assert_passes(case)
    case.kv_lens = torch.tensor([5, 16], device=DEVICE)
    _assert_passes(case)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "additive-finfo-min"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attn_mask_broadcast_and_fully_masked_rows(mask_kind, heads):
    shape = config_of(2, 4, 2, 21, 70, 64)
    case = verify.random_case(dataclasses.replace(shape, dtype=torch.bfloat16, causal=True), device=DEVICE)
    keep = torch.rand(2, heads, 21, 70, device=DEVICE) > 0.4
    keep[:, :, :3] = False  # fully masked rows: 0, never NaN
    if mask_kind == "bool":
        case.attn_mask = keep
    elif mask_kind == "additive":
        case.attn_mask = torch.randn(2, heads, 21, 70, device=DEVICE).masked_fill(~keep, -math.inf)
    else:  # transformers' padding masks: finfo.min, not -inf (rows of finfo.min average uniformly)
        case.attn_mask = torch.zeros(2, heads, 21, 70, device=DEVICE).masked_fill(
            ~keep, torch.finfo(torch.float32).min
        )
    _assert_passes(case)
    out = prefill_attention(case.q, case.k, case.v, attn_mask=case.attn_mask)
    assert torch.isfinite(out).all()
    if mask_kind != "additive-finfo-min":
        assert torch.all(out[:, :, :3] == 0)


def test_attn_mask_2d_with_padding_non_causal():
    case = verify.poisoned_case(
        config_of(2, 2, 1, 8, 40, 64, dtype=torch.float16, causal=False), device=DEVICE
    )
    case.attn_mask = torch.rand(8, 40, device=DEVICE) > 0.5
    case.attn_mask[:, 0] = True
    _assert_passes(case)


def test_out_buffer_is_written_in_place():
    case = verify.strided_case(
        config_of(1, 4, 2, 17, 40, 64, dtype=torch.float16, causal=True), device=DEVICE
    )
    out = torch.full(case.q.shape, math.nan, dtype=case.q.dtype, device=DEVICE)
    result = prefill_attention(case.q, case.k, case.v, out=out, scale=0.2)
    assert result.data_ptr() == out.data_ptr()
    expected = verify.reference_attention(case.q, case.k, case.v, causal=True, scale=0.2)
    assert float(verify.relative_l2_per_slice(out, expected).max()) < 1e-2


def test_empty_query_returns_empty():
    q = torch.randn(1, 2, 0, 64)
    k = torch.randn(1, 1, 5, 64)
    assert prefill_attention(q, k, k).shape == (1, 2, 0, 64)


def test_fake_impl_traces_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 33, 128, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 40, 128, dtype=torch.bfloat16)
        out = prefill_attention(q, k, k, kv_lens=torch.empty(2, dtype=torch.int32))
        assert out.shape == q.shape and out.dtype == q.dtype


def test_bucket_and_heuristic():
    bucket = prefill_mod.prefill_bucket(8, 32, 2048, 2048, 128, torch.bfloat16)
    assert bucket == "d128-rows512k-kv2k"
    assert prefill_mod.prefill_bucket(1, 32, 512, 4608, 128, torch.float32) == "fp32-d128-rows16k-kv8k-chunk"
    padded = prefill_mod.prefill_bucket(
        8, 32, 2048, 2048, 128, torch.bfloat16, has_q_lens=True, has_mask=True
    )
    assert padded == "d128-rows512k-kv2k-lens-mask"
    params = prefill_mod.heuristic_params(8, 32, 2048, 128, torch.bfloat16, "cpu")
    assert set(params) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}


F16 = {"dtype": torch.float16}


def _qkv(q_shape=(1, 4, 8, 64), kv_shape=(1, 2, 16, 64)):
    return torch.randn(q_shape, **F16), torch.randn(kv_shape, **F16), torch.randn(kv_shape, **F16)


BAD_INPUTS = [
    (lambda a: dict(zip("qkv", _qkv((1, 4, 8, 72), (1, 2, 16, 72)), strict=True)), ValueError,
     r"head_dim=72 is not supported \(64, 80, 96, 128, 256\)"),
    (lambda a: dict(zip("qkv", _qkv((1, 4, 8, 64), (1, 3, 16, 64)), strict=True)), ValueError,
     "not a multiple"),
    (lambda a: {"q": torch.randn(1, 4, 17, 64, **F16)}, ValueError, "q_len=17 exceeds kv_len=16"),
    (lambda a: {k: t.double() for k, t in a.items()}, TypeError, "float64 is not supported"),
    (lambda a: {"v": a["v"].float()}, TypeError, "dtypes differ"),
    (lambda a: {"attn_mask": torch.ones(1, 3, 8, 16, dtype=torch.bool)}, ValueError,
     r"does not broadcast to \[B, Hq, Lq, Lkv\]=\(1, 4, 8, 16\)"),
    (lambda a: {"attn_mask": torch.ones(8, 16, dtype=torch.int32)}, TypeError, "attn_mask dtype torch.int32"),
    (lambda a: {"causal": 1}, TypeError, "causal=1 must be True or False"),
    (lambda a: {"out": torch.empty(1, 4, 8, 32, **F16)}, ValueError, "out must match q"),
    (lambda a: {"q": a["q"][0]}, ValueError, "q must have 4 dims"),
]  # fmt: skip
# scale, kv_lens and q_lens errors (shared with decode): tests/test_bad_input.py


@pytest.mark.parametrize("change, error, message", BAD_INPUTS)
def test_errors_name_the_offending_value(change, error, message):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args.update(change(args))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message):
        prefill_attention(q, k, v, **args)
