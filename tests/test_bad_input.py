"""Bad input is refused with a message naming the value, and nothing reads out of bounds (issue 9).

Three parts: the shared host-side checks in config.py; both kernels refusing bad scales, lengths and meta
tensors; both kernels clamping out-of-range `kv_lens` / `q_lens` on the device (kv_lens > Lkv acts as Lkv,
negative as 0: a sequence whose rows see no key comes out 0, never NaN).
"""

import math

import pytest
import torch

from attnforge import verify
from attnforge.config import AttentionConfig, check_lengths, check_qkv, resolve_scale
from attnforge.kernels.decode import decode_attention
from attnforge.kernels.prefill import prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ----------------------------------------------------------------------------------------------------------
# The shared checks (config.py)


def test_resolve_scale_defaults_and_passes_numbers():
    assert resolve_scale(None, 64) == 0.125
    assert resolve_scale(2, 64) == 2.0 and isinstance(resolve_scale(2, 64), float)


@pytest.mark.parametrize(
    "scale, shown",
    [(math.nan, "nan"), (math.inf, "inf"), (-1, "-1"), (0.0, "0.0"), (True, "True"), ("0.1", "'0.1'")],
)
def test_resolve_scale_refuses(scale, shown):
    message = rf"scale={shown} is not accepted: it must be a finite number > 0 \(default 1/sqrt\(head_dim\)\)"
    with pytest.raises(ValueError, match=message):
        resolve_scale(scale, 64)


LENGTH_SPEC = r"an integer tensor \(int32 or int64\) of shape \[B\]=\(2,\) on cpu"


@pytest.mark.parametrize(
    "lens, error, message",
    [
        ([3, 4], TypeError, rf"kv_lens must be {LENGTH_SPEC}, got list"),
        (torch.tensor([3, 4, 5]), ValueError, rf"kv_lens must be {LENGTH_SPEC}, got shape \(3,\)"),
        (torch.tensor([[3, 4]]), ValueError, rf"kv_lens must be {LENGTH_SPEC}, got shape \(1, 2\)"),
        (torch.tensor([3.0, 4.0]), TypeError, r"kv_lens dtype torch.float32 is not supported; accepted: int"),
        (torch.tensor([True, False]), TypeError, r"kv_lens dtype torch.bool is not supported"),
        (torch.tensor([3, 4], dtype=torch.int16), TypeError, r"kv_lens dtype torch.int16 is not supported"),
        (torch.tensor([3, 4], device="meta"), ValueError, r"kv_lens is on meta: it must be on q's device cp"),
    ],
)
def test_check_lengths_refuses(lens, error, message):
    with pytest.raises(error, match=message):
        check_lengths("kv_lens", lens, 2, torch.device("cpu"))


def test_check_lengths_accepts_none_int32_int64_and_any_values():
    for lens in (None, torch.tensor([5, -3], dtype=torch.int32), torch.tensor([2**40, 0])):
        check_lengths("q_lens", lens, 2, "cpu")


def test_check_qkv_refuses_meta_tensors():
    q = torch.empty(1, 4, 3, 64, device="meta")
    k = torch.empty(1, 2, 8, 64)
    message = r"q is on the meta device: attnforge kernels need real tensors \(CUDA, or CPU under TRITON_INT"
    with pytest.raises(ValueError, match=message):
        check_qkv(q, k, k)
    with pytest.raises(ValueError, match=r"k is on the meta device"):
        check_qkv(k.new_empty(1, 4, 3, 64), k.to("meta"), k)


def test_check_qkv_accepts_the_fake_tensors_torch_compile_traces_with():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(1, 4, 3, 64), torch.empty(1, 2, 8, 64)
        assert q.device.type == "cpu"
        check_qkv(q, k, k)


def test_config_refuses_more_queries_than_keys():
    with pytest.raises(ValueError, match=r"seq_len=10 exceeds kv_len=5: .* seq_len <= kv_len is required"):
        AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64, seq_len=10, kv_len=5)


# ----------------------------------------------------------------------------------------------------------
# Both kernels refuse bad options


def _prefill(q, k, v, **options):
    return prefill_attention(q, k, v, causal=True, **options)


KERNELS = [
    pytest.param(_prefill, id="prefill"),
    pytest.param(decode_attention, id="decode"),
]


def _qkv(batch=2, q_len=3, kv_len=33, device=DEVICE):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, q_len, 64, generator=generator).to(device)
    k = torch.randn(batch, 2, kv_len, 64, generator=generator).to(device)
    v = torch.randn(batch, 2, kv_len, 64, generator=generator).to(device)
    return q, k, v


BAD_OPTIONS = [
    ({"scale": math.nan}, ValueError, r"scale=nan is not accepted: it must be a finite number > 0"),
    ({"scale": -1}, ValueError, r"scale=-1 is not accepted: it must be a finite number > 0"),
    ({"scale": math.inf}, ValueError, r"scale=inf is not accepted"),
    ({"scale": 0}, ValueError, r"scale=0 is not accepted"),
    ({"kv_lens": [100, 3]}, TypeError, r"kv_lens must be an integer tensor .* got list"),
    ({"kv_lens": torch.tensor([3])}, ValueError, r"kv_lens must be .* \[B\]=\(2,\) .* got shape \(1,\)"),
    ({"kv_lens": torch.tensor([3.0, 4.0])}, TypeError, r"kv_lens dtype torch.float32 is not supported"),
    ({"kv_lens": torch.tensor([3, 4], device="meta")}, ValueError, r"kv_lens is on meta: it must be on q's"),
]  # fmt: skip


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_refuse_bad_options(kernel, options, error, message):
    with pytest.raises(error, match=message):
        kernel(*_qkv(), **options)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_refuse_meta_tensors(kernel):
    q, k, v = (t.to("meta") for t in _qkv())
    with pytest.raises(ValueError, match=r"q is on the meta device: attnforge kernels need real tensors"):
        kernel(q, k, v)


def test_prefill_refuses_bad_q_lens():
    with pytest.raises(TypeError, match=r"q_lens dtype torch.float32 is not supported; accepted: int32, in"):
        _prefill(*_qkv(), q_lens=torch.tensor([3.0, 1.0]))
    with pytest.raises(TypeError, match=r"q_lens must be an integer tensor .* got tuple"):
        _prefill(*_qkv(), q_lens=(3, 1))


# ----------------------------------------------------------------------------------------------------------
# Out-of-range lengths are clamped on the device: [0, Lkv] for kv_lens, [0, Lq] for q_lens

# (kv_lens given, what the kernel must behave as) for a 33-key cache, batch 2
OUT_OF_RANGE_KV_LENS = {
    "above-the-cache": ([100, 20], [33, 20]),
    "negative": ([-5, 33], [0, 33]),
    "beyond-int32": ([2**32 + 5, 7], [33, 7]),  # an int64 that a cast to int32 would wrap to 5
}


def _in_oversized_storage(t: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`t` as the first kv_len keys of a NaN-filled buffer 4x as long: a kernel that reads past kv_len reads
    NaN (and stays inside memory, so the interpreter cannot crash)."""
    storage = torch.full((*t.shape[:2], 4 * kv_len, t.shape[3]), math.nan, dtype=t.dtype, device=t.device)
    storage[:, :, :kv_len] = t
    return storage[:, :, :kv_len]


def _assert_clamped(kernel, q, k, v, given, clamped, **options):
    dtype = torch.int64 if max(given) >= 2**31 else torch.int32
    kv_lens = torch.tensor(given, dtype=dtype, device=q.device)
    out = kernel(q, k, v, kv_lens=kv_lens, **options)
    expected_lens = torch.tensor(clamped, device=q.device)
    expected = verify.reference_attention(q, k, v, causal=True, kv_lens=expected_lens, **options)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    for b, length in enumerate(clamped):
        if length == 0:
            assert torch.all(out[b] == 0), "a sequence that sees no key must come out 0"


@pytest.mark.parametrize("given, clamped", OUT_OF_RANGE_KV_LENS.values(), ids=OUT_OF_RANGE_KV_LENS.keys())
@pytest.mark.parametrize("kernel", KERNELS)
def test_out_of_range_kv_lens_are_clamped(kernel, given, clamped):
    q, k, v = _qkv()
    k, v = _in_oversized_storage(k, 33), _in_oversized_storage(v, 33)
    _assert_clamped(kernel, q, k, v, given, clamped)


@pytest.mark.parametrize("q_lens, clamped", [([100, 3], [3, 3]), ([-3, 2**33], [0, 3])])
def test_out_of_range_q_lens_are_clamped(q_lens, clamped):
    q, k, v = _qkv()
    out = _prefill(q, k, v, q_lens=torch.tensor(q_lens, device=DEVICE))
    expected = verify.reference_attention(q, k, v, causal=True, q_lens=torch.tensor(clamped, device=DEVICE))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    if clamped[0] == 0:
        assert torch.all(out[0] == 0)


GPU_KERNELS = [
    pytest.param(_prefill, id="prefill"),
    pytest.param(decode_attention, id="decode"),
]


@NEEDS_GPU
@pytest.mark.parametrize("given, clamped", OUT_OF_RANGE_KV_LENS.values(), ids=OUT_OF_RANGE_KV_LENS.keys())
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_out_of_range_kv_lens_do_not_fault_on_the_gpu(kernel, given, clamped):
    """Exactly-sized CUDA buffers (no slack behind them): reading past them would be a fault here."""
    q, k, v = _qkv(device="cuda")
    _assert_clamped(kernel, q, k, v, given, clamped)
    torch.cuda.synchronize()  # an illegal access surfaces here
