"""Quantized checkpoints: `save_quantized`, `load_quantized`, and `convert` (load, quantize, save).

A checkpoint folder holds `model.safetensors` (each QuantizedLinear's `codes`, `scales`, `zeros`, `bias`; the
other parameters as they were), `config.json` (the model's transformers config plus a `quantization` section:
format, recipe, group size, bits per layer, backend, dtype, attnforge and torch versions, the device it was
quantized on, and tied tensors stored once), the generation config and the tokenizer if there is one.
It loads back through attnforge only (`af.load_quantized`): transformers does not know this format.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from attnforge.accel.quant.recipes import QuantizationReport, apply_plan, quantize

FORMAT = "attnforge-groupwise-v1"
WEIGHTS = "model.safetensors"


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write `model` (quantized by `quantize`) to `folder`; returns the folder."""
    from safetensors.torch import save_file

    import attnforge

    quantization = getattr(model, "attnforge_quantization", None)
    if quantization is None:
        raise ValueError("the model is not quantized: call attnforge.quantize(model, ...) first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_tensors(model)
    parameter = next(model.parameters())
    section = {
        **quantization,
        "format": FORMAT,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "attnforge_version": attnforge.__version__,
        "torch_version": torch.__version__,
        "device": _device_name(parameter.device),
        "aliases": aliases,
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "attnforge": FORMAT})
    config = model.config.to_dict()
    config["quantization"] = section
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_quantized(folder: str | Path, *, device: torch.device | str | None = None) -> nn.Module:
    """The causal LM saved by `save_quantized` (or `attnforge convert`), in eval mode, on `device`
    (default CPU).

    Its logits equal those of the model that was saved: same buffers, same dequantization.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    fields = json.loads((folder / "config.json").read_text())
    section = fields.pop("quantization", None)
    if not section or section.get("format") != FORMAT:
        raise ValueError(
            f"{folder} is not an attnforge quantized checkpoint (no quantization section {FORMAT!r})"
        )
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    dtype = getattr(torch, section["dtype"])
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    apply_plan(model, section["bits"], section["group_size"], section["backend"])
    state = load_file(str(folder / WEIGHTS))
    for alias, target in section["aliases"].items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=True)
    model.attnforge_quantization = {k: section[k] for k in ("recipe", "group_size", "backend", "bits")}
    return model.to(device or "cpu").eval()


def convert(
    source: str,
    destination: str | Path,
    *,
    recipe: str = "speed-4bit",
    group_size: int = 64,
    predicate=None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[QuantizationReport, str]:
    """Load `source` (a local HF folder, a bundled architecture with random weights, or "smollm2"), quantize
    it and save it to `destination`. Returns (report, a sentence saying what the weights were)."""
    from attnforge import models

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = None
    if source in (models.SMOLLM2_NAME, "smollm2"):
        model, tokenizer = models.load_smollm2(dtype=dtype, device=device)
        what = "SmolLM2-135M-Instruct, real weights"
    elif models.model_source(source) == "bundled":
        model = models.build_model(source, dtype=dtype, device=device)
        what = f"{source}: random weights (a bundled architecture)"
    else:
        from transformers import AutoTokenizer

        model = models.load_model(source, dtype=dtype, device=device)
        with contextlib.suppress(Exception):  # a checkpoint without a tokenizer is still a checkpoint
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        what = f"{source}: weights from the checkpoint"
    report = quantize(model, recipe, group_size, predicate)
    save_quantized(model, destination, tokenizer)
    return report, what


def load_predicate(spec: str):
    """`module:function` -> the function (for --predicate)."""
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise ValueError(
            f"predicate={spec!r} must be written module:function (e.g. mypackage.rules:keep_head)"
        )
    return getattr(importlib.import_module(module_name), function)


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict tensors, contiguous, each storage once; aliases maps a tied name to the stored one."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _no_init():
    """transformers' context that skips random initialization (the checkpoint overwrites every weight)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(module).no_init_weights()
    return contextlib.nullcontext()
