"""A decode step's new token by torch's own ops (q/k norms, rotate-half RoPE): the reference the tests of
kernels/rope_cache.py and kernels/decode_step.py compare with, and their random inputs."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rms(x, gain, eps):
    xf = x.float()
    return gain * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def tables(positions, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(positions).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def case(batch, heads, kv_heads, dim, dtype, seed, max_seq=24):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE, dtype)
    cache_k = torch.randn(batch + 1, kv_heads, max_seq, dim, generator=gen).to(DEVICE, dtype)
    gains = [(torch.rand(dim, generator=gen) + 0.5).to(DEVICE, dtype) for _ in range(2)]
    positions = torch.randint(0, max_seq, (batch, 1), generator=gen).to(DEVICE)
    return qkv, cache_k, cache_k.clone() * 2, gains, positions


def expected(qkv, heads, kv_heads, dim, cos, sin, positions, gains, eps):
    batch = qkv.shape[0]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(batch, 1, heads, dim), k.view(batch, 1, kv_heads, dim)
    if gains is not None:
        q, k = _rms(q, gains[0], eps), _rms(k, gains[1], eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    c, s = cos[positions[:, 0]][:, None, None], sin[positions[:, 0]][:, None, None]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v.view(batch, kv_heads, 1, dim)
