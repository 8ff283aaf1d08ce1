import pytest
import torch

import attnforge as af
from attnforge.config import AttentionConfig


@pytest.mark.parametrize(
    "heads, kv_heads, pattern, ratio",
    [
        (40, 8, "GQA-5:1", 5),
        (32, 8, "GQA-4:1", 4),
        (32, 32, "MHA", 1),
        (32, 1, "MQA", 32),
        (14, 2, "GQA-7:1", 7),
    ],
)
def test_attention_pattern(heads, kv_heads, pattern, ratio):
    cfg = af.AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=128, seq_len=1024)
    assert cfg.attention_pattern == pattern
    assert cfg.gqa_ratio == ratio


@pytest.mark.parametrize(
    "seq_len, phase", [(1, "decode"), (16, "decode"), (17, "prefill"), (4097, "prefill")]
)
def test_phase(seq_len, phase):
    assert AttentionConfig(num_heads=8, num_kv_heads=8, head_dim=64, seq_len=seq_len).phase == phase


def test_kv_len_defaults_to_seq_len():
    assert AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64, seq_len=7).kv_len == 7
    assert AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64, seq_len=1, kv_len=4097).kv_len == 4097


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 40, "num_kv_heads": 7}, r"num_heads=40 is not divisible by num_kv_heads=7"),
        ({"head_dim": 0}, r"head_dim=0 must be a positive integer"),
        ({"seq_len": 0}, r"seq_len=0 must be a positive integer"),
        ({"batch_size": -2}, r"batch_size=-2 must be a positive integer"),
        ({"kv_len": 0}, r"kv_len=0 must be a positive integer"),
        ({"num_heads": 8.5}, r"num_heads=8.5 must be a positive integer"),
        ({"dtype": torch.int8}, r"dtype=torch.int8 is not supported: attention needs a floating-point dtype"),
    ],
)
def test_invalid_config_names_the_value(kwargs, message):
    base = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "seq_len": 16}
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**{**base, **kwargs})


def test_from_sizes_takes_the_tensors_order():
    cfg = AttentionConfig.from_sizes(2, 12, 4, 3, 65, 80, dtype=torch.float16, causal=False)
    assert cfg.q_shape == (2, 12, 3, 80) and cfg.kv_shape == (2, 4, 65, 80)
    assert (cfg.dtype, cfg.causal, cfg.attention_pattern) == (torch.float16, False, "GQA-3:1")


@pytest.mark.parametrize(
    "sizes, dtype, reason",
    [
        ((1, 8, 2, 1, 100, 72), torch.bfloat16, "head_dim=72 is not one of (64, 80, 96, 128, 256)"),
        ((1, 8, 2, 1, 100, 64), torch.float64, "dtype=torch.float64 is not one of"),
    ],
)
def test_a_call_the_kernels_do_not_take_is_described_and_falls_back_with_the_reason(sizes, dtype, reason):
    cfg = AttentionConfig.from_sizes(*sizes, dtype=dtype)
    optimized, why = af.AttentionOptimizer().should_optimize(cfg, device="cpu")
    assert not optimized and reason in why and why.endswith("falling back to torch SDPA")


def test_from_tensors():
    q, k = torch.randn(3, 12, 5, 80), torch.randn(3, 4, 33, 80)
    cfg = AttentionConfig.from_tensors(q, k, k.clone())
    assert (cfg.batch_size, cfg.num_heads, cfg.num_kv_heads, cfg.seq_len, cfg.kv_len) == (3, 12, 4, 5, 33)
    assert cfg.attention_pattern == "GQA-3:1" and cfg.phase == "decode" and cfg.dtype == torch.float32


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, error, message",
    [
        ((2, 8, 4), (2, 8, 4, 64), (2, 8, 4, 64), ValueError, r"q must have 4 dims"),
        ((2, 8, 4, 64), (2, 8, 4, 64), (2, 8, 5, 64), ValueError, r"k and v shapes differ"),
        ((2, 8, 4, 64), (3, 8, 4, 64), (3, 8, 4, 64), ValueError, r"must agree in batch"),
        (
            (2, 8, 4, 64),
            (2, 8, 4, 128),
            (2, 8, 4, 128),
            ValueError,
            r"must agree in batch \(dim 0\) and head_dim",
        ),
        (
            (2, 8, 4, 64),
            (2, 3, 4, 64),
            (2, 3, 4, 64),
            ValueError,
            r"q heads 8 are not a multiple of k/v heads 3",
        ),
    ],
)
def test_from_tensors_rejects_bad_shapes(q_shape, k_shape, v_shape, error, message):
    with pytest.raises(error, match=message):
        AttentionConfig.from_tensors(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))


def test_from_tensors_rejects_mixed_dtypes_and_non_tensors():
    q = torch.randn(1, 8, 1, 64)
    with pytest.raises(TypeError, match=r"dtypes differ"):
        AttentionConfig.from_tensors(q, q.half(), q)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        AttentionConfig.from_tensors(q, [1, 2], q)
