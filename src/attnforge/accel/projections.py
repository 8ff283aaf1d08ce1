"""The products of the walk (forward.py): the model's own modules, or attnforge's skinny linear for decode.

A decode step is a few rows of hidden state against every weight matrix. `KernelProjections` runs those calls
(at most `gemv.fast_rows` rows, where the kernel was measured faster than cuBLAS: batch 1, up to batch 8
where the swapped product runs, a Hopper GPU and 16-bit weights) through `kernels.gemv.fused_linear`, which
also takes each product's neighbours into the same launch: the RMSNorm
before q/k/v, gate/up and the LM head, silu(gate) * up after gate/up, and the residual adds after o and down -
four launches per layer instead of eight or more. A neighbour is fused only where the model's module provably
computes what the kernel does: each norm and the activation are probed once (`torch.equal` against the
kernel's formula on the model's device and dtype); a module that differs (Gemma's `(1 + w)` norm, GELU) runs
as itself before the product. Quantized projections go through the kernel too where their backend runs
attnforge's packed GEMV (`kernels.gemv.PackedWeight`: the codes dequantized as they are read); on another
backend, of mixed bits, and calls with more rows (prefill, batches) use the model's modules
(`TorchProjections`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnforge.accel.cache import StaticKVCache
from attnforge.accel.layout import LayerPlan, ModelPlan
from attnforge.accel.quant.linear import QuantizedLinear

PROJECTION_BACKENDS = ("auto", "kernels", "torch")


class TorchProjections:
    """The model's own modules: norms, fused q/k/v and gate/up matmuls, o, down, LM head."""

    name = "the model's modules (torch matmuls)"

    def attention_in(self, index: int, layer: LayerPlan, hidden: torch.Tensor) -> torch.Tensor:
        """`[b, L, hidden] -> [b, L, q + k + v]`: input norm, then the fused q/k/v product."""
        return layer.qkv(layer.input_norm(hidden))

    def attention_out(self, index: int, layer: LayerPlan, out: torch.Tensor, hidden: torch.Tensor):
        """`hidden + o_proj(out)`, `[b, L, hidden]` (out `[b, L, heads * head_dim]`)."""
        return hidden + layer.o_proj(out)

    def mlp(self, index: int, layer: LayerPlan, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden + down(act(gate) * up)` over the post-attention norm, `[b, L, hidden]`."""
        gate, up = layer.gate_up(layer.post_norm(hidden)).chunk(2, dim=-1)
        return hidden + layer.down_proj(layer.act(gate) * up)

    def head(self, plan: ModelPlan, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[b, 1, vocab]` of the selected rows `[b, 1, hidden]` (final norm, LM head)."""
        return plan.lm_head(plan.final_norm(hidden))

    def new_token_rope(self, index: int, cache) -> NewTokenRope | None:
        """How attnforge's kernels may rotate a decode step's new token in layer `index` (what the model's
        modules compute, into a static cache), or None: the walk rotates it with the model's modules (here,
        always)."""
        return None


class NewTokenRope(NamedTuple):
    """A layer's rotation of the new token, in the kernels' terms (`kernels.decode_step`, `rope_cache`):
    RoPE tables `[max_seq_len, D]`, query heads, and the q/k RMSNorms `(gain [D], eps)` or None."""

    cos: torch.Tensor
    sin: torch.Tensor
    num_heads: int
    q_norm: tuple | None
    k_norm: tuple | None


@dataclass
class _Fused:
    """One layer's products for the kernel: weights and biases, and the neighbours it may fuse."""

    qkv: tuple
    o: tuple
    gate_up: tuple
    down: tuple
    input_norm: tuple | None
    post_norm: tuple | None
    silu: bool


class KernelProjections(TorchProjections):
    """Decode calls through `fused_linear` (neighbours fused where probed equal); the rest as torch's."""

    @property
    def name(self) -> str:
        rope = "the model's RoPE" if self.rope is None else "attention kernels (q/k norms, RoPE, cache write)"
        return (f"attnforge fused_linear (norm, silu * up and residual fused) for decode at batch "
                f"{self._gemv.FAST_ROWS} (up to {self._gemv.SWAP_FAST_ROWS} through TMA), {rope} for "
                "decode steps' new tokens; torch matmuls otherwise")  # fmt: skip

    def __init__(self, plan: ModelPlan, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        from attnforge.kernels import gemv

        self._gemv = gemv
        self.layers = [_fused_layer(layer, plan.dtype, plan.device) for layer in plan.layers]
        self.final_norm = rms_norm_params(plan.final_norm, plan.dtype, plan.device)
        self.lm_head = _product(plan.lm_head)
        self.num_heads, self.rope = plan.num_heads, rope if rope_is_rotate_half(plan, rope) else None
        self.qk_norms = [_qk_norms(layer, plan.dtype, plan.device) for layer in plan.layers]

    def _small(self, x: torch.Tensor, product: tuple) -> bool:
        """Whether `x`'s rows go through the kernel for `product` (weight, bias): up to `gemv.fast_rows`
        for weights as stored, FAST_ROWS for packed codes (several rows of them take the plain loop)."""
        rows = x.numel() // x.shape[-1]
        if isinstance(product[0], torch.Tensor):
            return rows <= self._gemv.fast_rows(x.device, x.dtype)
        return rows <= self._gemv.FAST_ROWS

    def attention_in(self, index, layer, hidden):
        fused = self.layers[index]
        if fused is None or not self._small(hidden, fused.qkv):
            return super().attention_in(index, layer, hidden)
        if fused.input_norm is None:
            return self._gemv.fused_linear(layer.input_norm(hidden), *fused.qkv)
        return self._gemv.fused_linear(hidden, *fused.qkv, norm=fused.input_norm)

    def attention_out(self, index, layer, out, hidden):
        fused = self.layers[index]
        if fused is None or not self._small(hidden, fused.o):
            return super().attention_out(index, layer, out, hidden)
        return self._gemv.fused_linear(out, *fused.o, residual=hidden)

    def mlp(self, index, layer, hidden):
        fused = self.layers[index]
        if fused is None or not self._small(hidden, fused.gate_up):
            return super().mlp(index, layer, hidden)
        x, norm = (layer.post_norm(hidden), None) if fused.post_norm is None else (hidden, fused.post_norm)
        if fused.silu:  # silu(gate) * up in the gate/up product's epilogue; down reads it as a plain row
            act = self._gemv.fused_linear(x, *fused.gate_up, norm=norm, glu=True)
            return self._gemv.fused_linear(act, *fused.down, residual=hidden)
        gate, up = self._gemv.fused_linear(x, *fused.gate_up, norm=norm).chunk(2, dim=-1)
        return self._gemv.fused_linear(layer.act(gate) * up, *fused.down, residual=hidden)

    def new_token_rope(self, index, cache):
        norms = self.qk_norms[index]
        if self.rope is None or norms is None or type(cache) is not StaticKVCache:
            return None  # another RoPE, norms that differ from the kernel's, or a rotating cache
        return NewTokenRope(*self.rope, self.num_heads, *norms)

    def head(self, plan, hidden):
        if self.lm_head is None or not self._small(hidden, self.lm_head):
            return super().head(plan, hidden)
        if self.final_norm is None:
            return self._gemv.fused_linear(plan.final_norm(hidden), *self.lm_head)
        return self._gemv.fused_linear(hidden, *self.lm_head, norm=self.final_norm)


def choose_projections(backend: str, plan: ModelPlan, attention_is_kernels: bool, rope: tuple):
    """The projection backend for `backend` ("auto": the kernel where attnforge's attention kernels run);
    `rope`: the walk's cos, sin tables `[max_seq_len, rotary_dim]`."""
    if backend not in PROJECTION_BACKENDS:
        raise ValueError(f"projections={backend!r} is not one of {PROJECTION_BACKENDS}")
    if backend == "kernels" and not attention_is_kernels:
        raise ValueError("projections='kernels' needs Triton (a CUDA GPU, or TRITON_INTERPRET=1)")
    if backend == "torch" or not attention_is_kernels:
        return TorchProjections()
    return KernelProjections(plan, rope)


def rms_norm_params(norm: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """`(gain, eps)` if `norm(x)` equals `gain * (x * rsqrt(mean(x^2) + eps))` (rounded to dtype first, as
    transformers' Llama/Qwen norms do) bit for bit on a probe; None otherwise (e.g. Gemma's `(1 + w)`)."""
    gain = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(gain, torch.Tensor) or gain.dim() != 1 or not isinstance(eps, float):
        return None
    x = _probe((3, gain.numel()), dtype, device)
    xf = x.float()
    expected = gain * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    with torch.no_grad():
        return (gain, eps) if torch.equal(norm(x), expected) else None


def rope_is_rotate_half(plan: ModelPlan, rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether the family's `apply_rope` is `x * cos + rotate_half(x) * sin` over the whole head (bit for bit
    on a probe, in the model's dtype): what `kernels.rope_cache` computes. Phi-3's partial rotary is not."""
    cos_table, sin_table = rope
    if cos_table.shape[-1] != plan.head_dim or cos_table.shape[0] < 2:
        return False
    q = _probe((1, plan.num_heads, 2, plan.head_dim), plan.dtype, plan.device)
    k = _probe((1, plan.num_kv_heads, 2, plan.head_dim), plan.dtype, plan.device)
    rows = torch.tensor([1, cos_table.shape[0] - 1], device=plan.device)
    cos, sin = cos_table[rows][None], sin_table[rows][None]
    with torch.no_grad():
        got = plan.apply_rope(q, k, cos, sin)
    half = plan.head_dim // 2
    expected = [
        x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None] for x in (q, k)
    ]
    return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _qk_norms(layer: LayerPlan, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """(q norm, k norm) params for the kernel: (None, None) without them; None where they differ from it."""
    if layer.q_norm is None:
        return None, None
    norms = rms_norm_params(layer.q_norm, dtype, device), rms_norm_params(layer.k_norm, dtype, device)
    if None in norms or norms[0][1] != norms[1][1]:
        return None
    return norms


def _fused_layer(layer: LayerPlan, dtype: torch.dtype, device: torch.device) -> _Fused | None:
    qkv = _product(layer.qkv_quantized) if layer.qkv_weight is None else (layer.qkv_weight, layer.qkv_bias)
    gate_up = (_product(layer.gate_up_quantized) if layer.gate_up_weight is None
               else (layer.gate_up_weight, layer.gate_up_bias))  # fmt: skip
    o, down = _product(layer.o_proj), _product(layer.down_proj)
    if qkv is None or gate_up is None or o is None or down is None:
        return None  # quantized projections on another backend, or of different bits: the model's modules
    gate = _probe((3, 64), dtype, device)
    with torch.no_grad():
        silu = torch.equal(layer.act(gate), F.silu(gate))
    return _Fused(
        qkv=qkv, o=o, gate_up=gate_up, down=down, input_norm=rms_norm_params(layer.input_norm, dtype, device),
        post_norm=rms_norm_params(layer.post_norm, dtype, device), silu=silu,
    )  # fmt: skip


def _product(module: nn.Module | None) -> tuple | None:
    """(weight, bias) for `fused_linear`: a plain nn.Linear's weight, or a quantized layer's packed codes
    where its products run attnforge's kernel (`runs_packed_gemv`: the "triton" backend, and "auto" /
    "tinygemm" for what core torch's int4 kernel does not serve); None for anything else (another backend,
    mixed bits)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if isinstance(module, QuantizedLinear) and module.runs_packed_gemv(module.codes.device):
        return module.packed(), module.bias
    return None


def _probe(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=generator) * 3).to(device=device, dtype=dtype)
