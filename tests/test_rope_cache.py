"""kernels/rope_cache.py: q/k norms, RoPE and the cache write of a decode step, against torch's own ops.

fp32 agrees to rounding (the interpreter and GPUs alike); bf16 on a GPU rounds as torch's ops do, while the
Triton interpreter truncates when it narrows to 16 bits, so on CPU bf16 is checked within one bf16 step.
"""

import new_token_reference as ref
import pytest
import torch

from attnforge.kernels.rope_cache import rope_and_store

DEVICE = ref.DEVICE


@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim", [(1, 4, 2, 64), (3, 3, 1, 80), (2, 2, 2, 96), (1, 2, 1, 128)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_queries_and_the_cache_match_torchs_ops(batch, heads, kv_heads, dim, dtype, norm):
    qkv, cache_k, cache_v, gains, positions = ref.case(batch, heads, kv_heads, dim, dtype, seed=batch + dim)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    cos, sin = ref.tables(24, dim, dtype)
    norms = {"q_norm": (gains[0], 1e-6), "k_norm": (gains[1], 1e-6)} if norm else {}
    q = rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, num_heads=heads, **norms)
    eq, ek, ev = ref.expected(qkv, heads, kv_heads, dim, cos, sin, positions, gains if norm else None, 1e-6)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.07, "rtol": 0.02}
    assert q.shape == (batch, heads, 1, dim) and q.is_contiguous()
    torch.testing.assert_close(q, eq, **tol)
    for b in range(batch):
        p = positions[b, 0]
        torch.testing.assert_close(cache_k[b, :, p], ek[b, :, 0], **tol)
        assert torch.equal(cache_v[b, :, p], ev[b, :, 0])
        before_k[b, :, p], before_v[b, :, p] = cache_k[b, :, p], cache_v[b, :, p]
    assert torch.equal(cache_k, before_k) and torch.equal(cache_v, before_v), "only the new slots changed"


@pytest.mark.parametrize("position", [-1, 24, 10**6])
def test_a_position_outside_the_cache_writes_nothing(position):
    qkv, cache_k, cache_v, _, _ = ref.case(2, 2, 1, 64, torch.float32, seed=3)
    before = cache_k.clone(), cache_v.clone()
    cos, sin = ref.tables(24, 64, torch.float32)
    positions = torch.tensor([[position], [position]], device=DEVICE)
    q = rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, num_heads=2)
    assert torch.isfinite(q).all()
    assert torch.equal(cache_k, before[0]) and torch.equal(cache_v, before[1])


def _args():
    qkv, cache_k, cache_v, gains, positions = ref.case(1, 2, 1, 64, torch.float32, seed=1)
    cos, sin = ref.tables(24, 64, torch.float32)
    return dict(qkv=qkv, cos=cos, sin=sin, positions=positions, cache_k=cache_k, cache_v=cache_v, num_heads=2)


BAD = [
    ({"qkv": lambda a: a["qkv"].int()}, "qkv has dtype torch.int32"),
    ({"qkv": lambda a: a["qkv"][..., :-64]}, "qkv must be [b <= 2, 1, 256] (one new token)"),
    ({"qkv": lambda a: a["qkv"].expand(1, 3, 256)}, "qkv must be [b <= 2, 1, 256]"),
    (
        {"cache_v": lambda a: a["cache_v"][:, :, :5]},
        "cache_k (2, 1, 24, 64) and cache_v (2, 1, 5, 64) must be",
    ),
    ({"cos": lambda a: a["cos"][:, :32]}, "cos and sin must be [positions, 64]"),
    ({"cos": lambda a: a["cos"][:20], "sin": lambda a: a["sin"][:20]}, "cos and sin have 20 rows; they need"),
    (
        {"cache_v": lambda a: torch.zeros(2, 1, 30, 64, device=DEVICE)[:, :, :24]},
        "cache_k and cache_v must have the same strides, got (1536, 1536, 64, 1) and (1920, 1920, 64, 1)",
    ),
    ({"positions": lambda a: a["positions"].float()}, "positions must be integer [1, 1]"),
    ({"sin": lambda a: a["sin"].double()}, "sin is torch.float64"),
    ({"q_norm": lambda a: (torch.ones(3, device=DEVICE), 1e-6)}, "q_norm gain must have shape (64,)"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_is_refused_with_the_reason(change, message):
    args = _args()
    args.update({name: make(args) for name, make in change.items()})
    with pytest.raises(ValueError) as error:
        rope_and_store(**args)
    assert message in str(error.value)


def test_q_and_k_norms_must_share_eps():
    args = _args()
    gain = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="q_norm and k_norm must share eps, got 1e-06 and 1e-05"):
        rope_and_store(**args, q_norm=(gain, 1e-6), k_norm=(gain, 1e-5))
