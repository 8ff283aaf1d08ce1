"""What the accelerator runs of a transformers model: its own modules, with q/k/v and gate/up fused.

The accelerator does not call the model's `forward`. It walks the model's own pieces layer by layer (its
embedding, rotary embedding, norms, activation, output projections and LM head, and the model family's own
`apply_rotary_pos_emb`), because two things a decode step needs are not reachable through `forward`:
  - fused projections: q/k/v become one matmul and gate/up another (one weight read and one launch instead
    of three and two; at batch 1 each launch costs more than its arithmetic). The fused weights are the
    model's weights: each projection's `weight` is re-pointed at its rows of the fused tensor, so the values
    (and the model's own outputs) stay exactly the same and no memory is duplicated;
  - no per-step mask, cache protocol or Python dispatch: attention reads per-sequence valid lengths.
Families whose layers have this layout are listed in FAMILIES; anything else is refused with the reason.
Quantized models (attnforge.quantize) are fused the same way: the QuantizedLinear layers' codes, scales and
zeros are concatenated along the output rows (`fuse_quantized`), unless the fused layers differ in bits or
group size (a predicate's choice), in which case each projection runs alone and the outputs are concatenated.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attnforge.accel.quant.linear import QuantizedLinear, fuse_quantized
from attnforge.config import SUPPORTED_HEAD_DIMS

# model_type -> what differs from Llama in the decoder layer (all share the walk in forward.py)
FAMILIES = {
    "llama": "q/k/v, o, gate/up/down projections (biases where the config sets them)",
    "mistral": "as llama (sliding window only where it reaches past max_seq_len: refused)",
    "qwen2": "as llama, with q/k/v biases",
    "qwen3": "as llama, with RMSNorm on each query and key head before RoPE",
    "gemma": "as llama, with a scaled embedding, (1 + w) RMSNorm and GELU (all the model's own modules)",
    "phi3": "q/k/v and gate/up already fused in the checkpoint; partial RoPE by the model's own function",
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DYNAMIC_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The model cannot be accelerated; the message says why and what is supported."""


@dataclass
class LayerPlan:
    """One decoder layer: the model's modules, and the fused projection weights (views of the originals).

    A quantized model has no fused weight tensors (`qkv_weight`, `gate_up_weight` are None): `qkv_quantized` /
    `gate_up_quantized` compute the fused projections instead.
    """

    input_norm: nn.Module
    post_norm: nn.Module
    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: nn.Module
    gate_up_weight: torch.Tensor | None
    gate_up_bias: torch.Tensor | None
    down_proj: nn.Module
    act: nn.Module
    scale: float
    qkv_quantized: nn.Module | None = None
    gate_up_quantized: nn.Module | None = None

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """`[b, L, hidden] -> [b, L, q + k + v sizes]`."""
        if self.qkv_quantized is not None:
            return self.qkv_quantized(x)
        return F.linear(x, self.qkv_weight, self.qkv_bias)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """`[b, L, hidden] -> [b, L, 2 * intermediate]`."""
        if self.gate_up_quantized is not None:
            return self.gate_up_quantized(x)
        return F.linear(x, self.gate_up_weight, self.gate_up_bias)


@dataclass
class ModelPlan:
    """The whole walk: embedding -> layers -> final norm -> LM head, with the attention shapes."""

    model: nn.Module
    model_type: str
    embed: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    apply_rope: object
    layers: list[LayerPlan]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads: every parameter once, except the embedding table, of
        which only the looked-up rows are read (unless the LM head shares it, then it is read whole)."""
        seen: set[int] = set()
        total = 0
        for parameter in self.model.state_dict(keep_vars=True).values():  # quantized codes are buffers
            key = (
                parameter.untyped_storage().data_ptr() + parameter.storage_offset() * parameter.element_size()
            )
            if key in seen:
                continue
            seen.add(key)
            total += parameter.numel() * parameter.element_size()
        embedding = self.embed.weight
        head = getattr(self.lm_head, "weight", None)  # a quantized LM head has codes, not a weight
        if head is None or embedding.data_ptr() != head.data_ptr():
            total -= embedding.numel() * embedding.element_size()
        return total

    def rope_table(self, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[max_seq_len, rotary_dim]` from the model's own rotary embedding, in the model dtype.

        The same values as computing them per step: each entry is one product (position x frequency) then
        cos/sin, independent of how many positions are computed together.
        """
        positions = torch.arange(max_seq_len, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.rotary(probe, positions)
        return cos[0].contiguous(), sin[0].contiguous()


def check_model(model: nn.Module, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
    """Raise UnsupportedModelError if the accelerator cannot run `model` (nothing is changed).

    `dtype`: the dtype the model will be cast to (default: its own).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by the accelerator; supported: {', '.join(FAMILIES)}"
        )
    _check_config(config, max_seq_len)
    base = getattr(model, "base_model", None)
    if base is None or getattr(model, "lm_head", None) is None or not hasattr(base, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal LM with .model.layers and .lm_head (load it with "
            "AutoModelForCausalLM)"
        )
    _check_rope(base.rotary_emb, config, max_seq_len)
    head_dim = base.layers[0].self_attn.head_dim
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedModelError(
            f"head_dim={head_dim} is not supported by attnforge's kernels {SUPPORTED_HEAD_DIMS}"
        )
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in DTYPES:
        raise UnsupportedModelError(
            f"dtype {dtype} is not supported; accepted: {', '.join(map(str, DTYPES))}"
        )
    _rope_function(base.layers[0].self_attn)
    for index, layer in enumerate(base.layers):
        _check_layer(layer, index, max_seq_len)


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a model that passed `check_model`."""
    base = model.base_model
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    return len(base.layers), kv_heads, base.layers[0].self_attn.head_dim


def plan_model(model: nn.Module, max_seq_len: int) -> ModelPlan:
    """Check `model` and build its plan; fuses its q/k/v and gate/up weights in place (same values), and has
    each quantized layer convert what its backend needs (`QuantizedLinear.prepare`) before compile or capture.

    Raises:
        UnsupportedModelError: not a causal LM of a family in FAMILIES, or a feature the walk does not do.
    """
    check_model(model, max_seq_len)
    config, base, lm_head = model.config, model.base_model, model.lm_head
    first = base.layers[0].self_attn
    num_heads = config.num_attention_heads
    parameter = next(model.parameters())
    layers = [_plan_layer(layer) for layer in base.layers]
    fused = [m for layer in layers for m in (layer.qkv_quantized, layer.gate_up_quantized) if m is not None]
    for module in (m for root in (model, *fused) for m in root.modules()):
        if isinstance(module, QuantizedLinear):  # what a backend converts, before compile and capture see it
            module.prepare(parameter.device)
    return ModelPlan(
        model=model, model_type=config.model_type, embed=base.embed_tokens, final_norm=base.norm,
        lm_head=lm_head, rotary=base.rotary_emb, apply_rope=_rope_function(first), layers=layers,
        num_heads=num_heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=first.head_dim, vocab_size=lm_head.out_features, dtype=parameter.dtype,
        device=parameter.device,
    )  # fmt: skip


def _check_config(config, max_seq_len: int) -> None:
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise UnsupportedModelError("final_logit_softcapping is not supported by the accelerator")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_seq_len > limit:
        raise UnsupportedModelError(
            f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}"
        )


def _check_rope(rotary: nn.Module, config, max_seq_len: int) -> None:
    """RoPE types that change their frequencies with the sequence length are exact (and graph-safe) only while
    the sequence stays within the original context: the frequencies then never change."""
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if not any(kind in rope_type for kind in DYNAMIC_ROPE):
        return
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    original = min(
        getattr(rotary, "original_max_seq_len", math.inf),
        parameters.get("original_max_position_embeddings") or math.inf,
    )
    if max_seq_len > original:
        raise UnsupportedModelError(
            f"rope_type={rope_type!r} changes its frequencies past {original} tokens; the accelerator needs "
            f"max_seq_len <= {original} (got {max_seq_len})"
        )


def _rope_function(attention: nn.Module):
    """The family's own `apply_rotary_pos_emb` (Phi-3's handles partial rotary dimensions)."""
    function = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if function is None:
        raise UnsupportedModelError(f"{type(attention).__module__} has no apply_rotary_pos_emb")
    return function


def _window(attention: nn.Module, config) -> int | None:
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None)


def _check_layer(layer: nn.Module, index: int, max_seq_len: int) -> None:
    attention, mlp = layer.self_attn, layer.mlp
    window = _window(attention, attention.config)
    if window is not None and window < max_seq_len:
        raise UnsupportedModelError(
            f"layer {index} uses sliding-window attention (window {window} < max_seq_len={max_seq_len}), "
            f"which the accelerator does not implement; use max_seq_len <= {window}"
        )
    if _activation(mlp) is None:
        raise UnsupportedModelError(f"layer {index}: {type(mlp).__name__} has no act_fn / activation_fn")
    names = ("qkv_proj", "q_proj", "k_proj", "v_proj", "gate_up_proj", "gate_proj", "up_proj")
    projections = [p for p in names if hasattr(attention, p) or hasattr(mlp, p)]
    fused_attention = "qkv_proj" in projections or {"q_proj", "k_proj", "v_proj"} <= set(projections)
    fused_mlp = "gate_up_proj" in projections or {"gate_proj", "up_proj"} <= set(projections)
    if not (fused_attention and fused_mlp and hasattr(mlp, "down_proj") and hasattr(attention, "o_proj")):
        raise UnsupportedModelError(
            f"layer {index}: projections {projections} are not a layout the accelerator knows"
        )
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        owner = attention if group[0] == "q_proj" else mlp
        biased = [getattr(getattr(owner, name, None), "bias", None) is not None for name in group]
        if hasattr(owner, group[0]) and any(biased) and not all(biased):
            raise UnsupportedModelError(
                f"layer {index}: {', '.join(group)} must all have a bias or none (they are fused into one "
                f"matmul); biases: {dict(zip(group, biased, strict=True))}"
            )


def _activation(mlp: nn.Module):
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)


def _plan_layer(layer: nn.Module) -> LayerPlan:
    attention, mlp = layer.self_attn, layer.mlp
    if hasattr(attention, "qkv_proj"):
        qkv = _projection([attention.qkv_proj])
    else:
        qkv = _projection([attention.q_proj, attention.k_proj, attention.v_proj])
    heads = attention.config.num_attention_heads
    kv_heads = getattr(attention.config, "num_key_value_heads", None) or heads
    head_dim = attention.head_dim
    sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if hasattr(mlp, "gate_up_proj"):
        gate_up = _projection([mlp.gate_up_proj])
    else:
        gate_up = _projection([mlp.gate_proj, mlp.up_proj])
    return LayerPlan(
        input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, qkv_weight=qkv[0],
        qkv_bias=qkv[1], qkv_sizes=sizes, q_norm=getattr(attention, "q_norm", None),
        k_norm=getattr(attention, "k_norm", None), o_proj=attention.o_proj, gate_up_weight=gate_up[0],
        gate_up_bias=gate_up[1], down_proj=mlp.down_proj, act=_activation(mlp), scale=attention.scaling,
        qkv_quantized=qkv[2], gate_up_quantized=gate_up[2],
    )  # fmt: skip


def _projection(
    linears: list[nn.Module],
) -> tuple[torch.Tensor | None, torch.Tensor | None, nn.Module | None]:
    """(fused weight, fused bias, None) for nn.Linear layers; (None, None, module) if any is quantized."""
    if not any(isinstance(linear, QuantizedLinear) for linear in linears):
        if len(linears) == 1:
            return linears[0].weight, linears[0].bias, None
        return (*fuse_linears(linears), None)
    fused = None
    if all(isinstance(linear, QuantizedLinear) for linear in linears):
        fused = linears[0] if len(linears) == 1 else fuse_quantized(linears)
    return None, None, fused if fused is not None else ConcatProjections(linears)


class ConcatProjections(nn.Module):
    """Projections that cannot share one matmul (different bits, or some unquantized): each runs on the same
    input and the outputs are concatenated, `[..., hidden] -> [..., sum of out_features]`."""

    def __init__(self, linears: list[nn.Module]) -> None:
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x) for linear in self.linears], dim=-1)


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input: `cat` of theirs along the output rows.

    Each linear's parameter is re-pointed at its rows of the fused tensor (same values, no second copy). A
    second call on the same linears finds them already adjacent and returns the existing fused tensor.
    """
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise UnsupportedModelError("some of the fused projections have a bias and others do not")
    return _fuse([w for w in weights]), (None if biases[0] is None else _fuse(biases))


def _fuse(parameters: list[nn.Parameter]) -> torch.Tensor:
    base = parameters[0]
    if _adjacent(parameters):
        rows = sum(p.shape[0] for p in parameters)
        return base.as_strided((rows, *base.shape[1:]), base.stride(), base.storage_offset())
    with torch.no_grad():
        fused = torch.cat([p.detach() for p in parameters])
    start = 0
    for parameter in parameters:
        rows = parameter.shape[0]
        parameter.data = fused[start : start + rows]
        start += rows
    return fused


def _adjacent(parameters: list[nn.Parameter]) -> bool:
    """The parameters already lie one after another in one storage (fused by an earlier call)."""
    storage = parameters[0].untyped_storage().data_ptr()
    offset = parameters[0].storage_offset()
    for parameter in parameters:
        if not parameter.is_contiguous() or parameter.untyped_storage().data_ptr() != storage:
            return False
        if parameter.storage_offset() != offset:
            return False
        offset += parameter.numel()
    return True
