"""`quantize(model, recipe, group_size, predicate)`: which layers get how many bits, and the swap itself.

Recipes (weight-only; only `nn.Linear` layers are quantized, embeddings never are: a step reads only the rows
of its tokens, so quantizing them saves memory but no bandwidth):
  speed-4bit     every linear (LM head included) at 4 bits
  balanced-5bit  every linear at 5 bits
  quality-8bit   every linear at 8 bits
  mixed          4 bits, except the LM head (kept unquantized: its error lands on the logits directly, and in
                 models that tie it to the embedding it then stays shared) and each layer's `v_proj` and
                 `down_proj` at 8 bits (the layers llama.cpp's Q4_K_M also keeps at higher precision)
A predicate `predicate(name, module) -> bool | int` overrides the recipe per layer: False keeps the layer
unquantized, True uses the recipe's bits, an int (4, 5, 8) sets the bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from attnforge.accel.quant.linear import BITS, QuantizedLinear, check_backend, check_group_size

RECIPES = {
    "speed-4bit": "every linear at 4 bits",
    "balanced-5bit": "every linear at 5 bits",
    "quality-8bit": "every linear at 8 bits",
    "mixed": "4 bits; v_proj and down_proj at 8 bits; LM head unquantized",
}
MIXED_HIGH = ("v_proj", "down_proj")
Predicate = Callable[[str, nn.Module], "bool | int"]


@dataclass
class LayerReport:
    """One linear layer: its bits (None: unquantized) and its bytes before and after."""

    name: str
    shape: tuple[int, int]
    bits: int | None
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizationReport:
    """What `quantize` did: per-layer bits and bytes, and the whole model's bytes (unique storages)."""

    recipe: str
    group_size: int
    backend: str
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def bits(self) -> dict[str, int | None]:
        """Layer name -> bits (None: kept unquantized)."""
        return {layer.name: layer.bits for layer in self.layers}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers:
            key = f"{layer.bits}-bit" if layer.bits else "unquantized"
            counts[key] = counts.get(key, 0) + 1
        layers = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return (
            f"{self.recipe}, group {self.group_size}: {layers}; model {self.model_bytes_before / 1e6:.1f} MB "
            f"-> {self.model_bytes_after / 1e6:.1f} MB"
        )


def recipe_bits(recipe: str, name: str) -> int | None:
    """The bits `recipe` gives the linear layer called `name` (None: keep it unquantized)."""
    check_recipe(recipe)
    if recipe == "mixed":
        if name.split(".")[-1] == "lm_head":
            return None
        return 8 if name.split(".")[-1] in MIXED_HIGH else 4
    return {"speed-4bit": 4, "balanced-5bit": 5, "quality-8bit": 8}[recipe]


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is not a quantization recipe; accepted: {', '.join(RECIPES)}")


def plan_bits(model: nn.Module, recipe: str, group_size: int, predicate: Predicate | None = None) -> dict:
    """Layer name -> bits (None: unquantized) for every nn.Linear of `model`; checks every input first."""
    check_recipe(recipe)
    check_group_size(group_size)
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        bits = recipe_bits(recipe, name)
        if predicate is not None:
            bits = _predicate_bits(predicate(name, module), bits, name)
        if bits is not None:
            check_group_size(group_size, module.in_features, name)
        plan[name] = bits
    return plan


def _predicate_bits(choice, default: int | None, name: str) -> int | None:
    if choice is True:
        return default
    if choice is False:
        return None
    if isinstance(choice, int) and choice in BITS:
        return choice
    raise ValueError(
        f"predicate returned {choice!r} for layer {name!r}; accepted: True, False or bits {BITS}"
    )


def quantize(
    model: nn.Module,
    recipe: str = "speed-4bit",
    group_size: int = 64,
    predicate: Predicate | None = None,
    backend: str = "auto",
) -> QuantizationReport:
    """Replace `model`'s nn.Linear layers by QuantizedLinear in place, as `recipe` (and `predicate`) say.

    Args:
        model: any torch module (a transformers causal LM typically); its linears' weights are `[out, in]`.
        recipe: one of RECIPES. group_size: 32, 64 or 128 input features per scale.
        predicate: `(name, module) -> bool | int` per linear layer (see the module docstring).
        backend: the matmul backend of the new layers (a key of MATMUL_BACKENDS); "auto": the fastest
            measured per call (core torch's int4 kernel for 4-bit bf16 on CUDA, attnforge's packed GEMV for
            the other bits there, the torch reference off a GPU).
    Returns:
        QuantizationReport. Nothing is changed if any input is invalid (all are checked first).
    """
    check_backend(backend)
    plan = plan_bits(model, recipe, group_size, predicate)
    report = QuantizationReport(recipe, group_size, backend, model_bytes_before=model_bytes(model))
    for name, bits in plan.items():
        linear = model.get_submodule(name)
        before = sum(p.numel() * p.element_size() for p in linear.parameters())
        after = before
        if bits is not None:
            with torch.no_grad():
                layer = QuantizedLinear.from_linear(linear, bits, group_size, backend)
                layer.prepare(layer.codes.device)  # a backend's own format now, not inside torch.compile
            _replace(model, name, layer)
            after = layer.nbytes()
        report.layers.append(
            LayerReport(name, (linear.out_features, linear.in_features), bits, before, after)
        )
    report.model_bytes_after = model_bytes(model)
    _remember(model, report)
    return report


def apply_plan(model: nn.Module, plan: dict, group_size: int, backend: str = "auto") -> None:
    """Swap the planned linears for empty QuantizedLinear layers of the same shapes (to load a checkpoint)."""
    for name, bits in plan.items():
        if bits is None:
            continue
        layer = QuantizedLinear.shaped_like(model.get_submodule(name), bits, group_size, backend)
        _replace(model, name, layer)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _remember(model: nn.Module, report: QuantizationReport) -> None:
    """Keep the recipe on the model (checkpoints write it into config.json)."""
    model.attnforge_quantization = {
        "recipe": report.recipe,
        "group_size": report.group_size,
        "backend": report.backend,
        "bits": report.bits,
    }
