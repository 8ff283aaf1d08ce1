"""Bad input is refused with a message naming the value (issue 9): shared host-side checks (config.py)."""

import math

import pytest
import torch

from attnforge.config import AttentionConfig, check_lengths, check_qkv, resolve_scale

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
