"""mlx-lm's own conveniences, surfaced rather than rewritten, with the known traps handled.

- `make_cache(model, max_kv_size=...)`: mlx-lm's `make_prompt_cache` silently ignores `max_kv_size` for every
  model that defines `make_cache` (llama and mistral among them): here it is honoured, or refused clearly.
- `generate(..., max_kv_size=..., kv_bits=...)`: mlx-lm cannot quantize a RotatingKVCache and raises
  NotImplementedError only once the cache reaches `quantized_kv_start` tokens (5000 by default), mid-answer:
  here the combination is refused before anything runs.
- `quantize(model, config, recipe="mixed_4_6")` and `convert(hf_path, mlx_path, recipe=...)`: mlx-lm's
  mixed-precision recipes (QUANT_RECIPES) by name, checked before anything is loaded or written.
- `build_model(config)`: a random-weight mlx-lm model from a config dict or a bundled architecture name.
- `load_gguf(path)`: a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct Q4_1) as an mlx-lm model
  and tokenizer; `mx.load` reads the tensors, Q4_0/Q4_1/Q8_0 straight into MLX's quantized layout.
"""

from __future__ import annotations

import copy
import importlib
from functools import partial
from pathlib import Path

from attnforge.integrations import MLX_INSTALL_HINT

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path
    from mlx_lm import utils as mlx_utils
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    # mlx_lm's package namespace rebinds these module names to functions: import the modules themselves.
    mlx_convert = importlib.import_module("mlx_lm.convert")
    mlx_generate = importlib.import_module("mlx_lm.generate")
except ImportError as error:  # pragma: no cover - exercised by hiding mlx in the tests
    raise ImportError(MLX_INSTALL_HINT) from error

QUANT_RECIPES = tuple(mlx_convert.QUANT_RECIPES)  # mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6 in mlx-lm 0.32
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
CONVERT_DTYPES = ("float16", "bfloat16", "float32")
# mlx-lm keeps the first tokens of a RotatingKVCache (attention sinks) when it rotates.
ROTATING_KEEP = 4


# ----------------------------------------------------------------------------------------------------------
# Caches


def make_cache(model: nn.Module, *, max_kv_size: int | None = None) -> list:
    """The model's KV cache for generation, with `max_kv_size` honoured for every model.

    Without `max_kv_size`: what mlx-lm builds (`model.make_cache()` or one KVCache per layer). With it, each
    unbounded KVCache layer becomes a RotatingKVCache of `max_kv_size` tokens (mlx-lm's own choice, keeping
    the first 4); layers that already rotate (sliding windows) keep the smaller of the two sizes.

    Raises:
        ValueError: `max_kv_size` is not an integer > 4, or a layer's cache cannot be bounded (e.g. the
            state of a recurrent layer), naming the layer and its cache type.
    """
    if max_kv_size is None:
        return mlx_cache.make_prompt_cache(model)
    if not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool) or max_kv_size <= ROTATING_KEEP:
        raise ValueError(
            f"max_kv_size={max_kv_size!r} must be an integer > {ROTATING_KEEP} (mlx-lm keeps the first "
            f"{ROTATING_KEEP} tokens of a rotating cache)"
        )
    if not hasattr(model, "make_cache"):
        return mlx_cache.make_prompt_cache(model, max_kv_size=max_kv_size)
    return [_bounded(layer, index, max_kv_size, model) for index, layer in enumerate(model.make_cache())]


def _bounded(layer, index: int, max_kv_size: int, model):
    if type(layer) is mlx_cache.KVCache:
        return mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=ROTATING_KEEP)
    if type(layer) is mlx_cache.RotatingKVCache:
        if layer.max_size <= max_kv_size:
            return layer
        return mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=max(layer.keep, ROTATING_KEEP))
    raise ValueError(
        f"max_kv_size={max_kv_size} cannot be honoured for {type(model).__module__}: layer {index} uses "
        f"{type(layer).__name__}; only KVCache and RotatingKVCache layers can be bounded. Generate without "
        "max_kv_size for this model."
    )


def check_cache_options(cache: list, *, max_kv_size: int | None, kv_bits: int | None) -> None:
    """Raise ValueError before generation for cache options mlx-lm would only fail on mid-generation."""
    if kv_bits is None:
        return
    if kv_bits not in QUANT_BITS:
        raise ValueError(f"kv_bits={kv_bits!r} is not supported; accepted: {QUANT_BITS}")
    if max_kv_size is not None:
        raise ValueError(
            f"kv_bits={kv_bits} cannot be combined with max_kv_size={max_kv_size}: mlx-lm cannot quantize "
            "a RotatingKVCache (it raises NotImplementedError 'RotatingKVCache Quantization NYI' once the "
            "cache holds quantized_kv_start tokens). Use max_kv_size for a bounded cache or kv_bits for a "
            "quantized full cache, not both."
        )
    rotating = [i for i, layer in enumerate(cache) if isinstance(layer, mlx_cache.RotatingKVCache)]
    if rotating:
        raise ValueError(
            f"kv_bits={kv_bits}: layers {rotating} of this model use a RotatingKVCache (sliding-window "
            "attention), which mlx-lm cannot quantize (NotImplementedError once quantization starts). "
            "Generate without kv_bits for this model."
        )


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = mlx_generate.DEFAULT_QUANTIZED_KV_START,
    **kwargs,
) -> str:
    """`mlx_lm.generate` with the cache built by `make_cache` and the cache options checked up front.

    Args:
        prompt: text or token ids. max_kv_size: bound the cache (honoured for every model, see make_cache).
        kv_bits, kv_group_size, quantized_kv_start: mlx-lm's KV-cache quantization (refused up front where
            mlx-lm would raise mid-generation). **kwargs: passed to `mlx_lm.generate` (sampler, verbose, ...).

    Returns:
        the generated text.
    """
    if kv_group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"kv_group_size={kv_group_size!r} is not supported; accepted: {QUANT_GROUP_SIZES}")
    cache = make_cache(model, max_kv_size=max_kv_size)
    check_cache_options(cache, max_kv_size=max_kv_size, kv_bits=kv_bits)
    return mlx_generate.generate(
        model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache, kv_bits=kv_bits,
        kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start, **kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Quantization recipes and conversion


def _check_quantization(recipe: str | None, bits: int | None, group_size: int) -> None:
    if recipe is not None and recipe not in QUANT_RECIPES:
        raise ValueError(f"recipe={recipe!r} is not one of mlx-lm's recipes {QUANT_RECIPES}")
    if recipe is not None and bits is not None:
        raise ValueError(
            f"recipe={recipe!r} sets the bits of every layer; bits={bits} would be ignored: pass one of them"
        )
    if bits is not None and bits not in QUANT_BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted: {QUANT_BITS}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; accepted: {QUANT_GROUP_SIZES}")


def _check_recipe_fits(recipe: str, model: nn.Module) -> None:
    if not any("down_proj" in name for name, _ in model.named_modules()):
        raise ValueError(
            f"recipe={recipe!r} needs MLP layers named 'down_proj' (mlx-lm's mixed recipes pick the layers "
            f"that get more bits by that name); {type(model).__module__} has none: use bits= instead"
        )


def quantize(
    model: nn.Module,
    config: dict,
    *,
    recipe: str | None = None,
    bits: int | None = None,
    group_size: int = 64,
) -> tuple[nn.Module, dict]:
    """Quantize a loaded model in place with mlx-lm (`quantize_model`), by recipe or uniformly.

    Args:
        config: the model's config dict (gets the `quantization` entry mlx-lm's loader reads back).
        recipe: one of QUANT_RECIPES, e.g. "mixed_4_6": 4-bit layers, 6 bits for v_proj/down_proj of the first
            and last eighth of the layers (and every third between) and for lm_head, as llama.cpp's Q4_K_M.
        bits: uniform bits per weight (QUANT_BITS) instead of a recipe; neither means mlx-lm's 4.
        group_size: weights sharing one scale and bias (32, 64, 128).

    Returns:
        (model, config with the quantization recorded).
    """
    _check_quantization(recipe, bits, group_size)
    predicate = None
    if recipe is not None:
        _check_recipe_fits(recipe, model)
        predicate = mlx_convert.mixed_quant_predicate_builder(recipe, model, group_size)
    return mlx_utils.quantize_model(model, config, group_size, bits or 4, quant_predicate=predicate)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    recipe: str | None = None,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
) -> Path:
    """`mlx_lm.convert`: a Hugging Face checkpoint (local directory or hub id) to an MLX model directory.

    Args:
        recipe / bits / group_size: quantize as `quantize` does (none of them: no quantization).
        dtype: "float16", "bfloat16" or "float32" for the unquantized weights (default: the checkpoint's).

    Returns:
        mlx_path, which `mlx_lm.load` reads.
    """
    _check_quantization(recipe, bits, group_size)
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {CONVERT_DTYPES}")
    mlx_path = Path(mlx_path)
    if mlx_path.exists():
        raise ValueError(f"mlx_path={str(mlx_path)!r} already exists; mlx-lm writes a new directory")
    mlx_convert.convert(
        str(hf_path), str(mlx_path), quantize=recipe is not None or bits is not None, q_group_size=group_size,
        q_bits=bits, dtype=dtype, quant_predicate=recipe,
    )  # fmt: skip
    return mlx_path


# ----------------------------------------------------------------------------------------------------------
# Models


def _scaled_projection(factor: float, path: str, value: mx.array) -> mx.array:
    return value * factor if path.endswith("proj.weight") else value


def model_module(model_type: str):
    """The mlx-lm module of a `model_type` ("mistral" -> mlx_lm.models.llama, as mlx-lm maps it)."""
    name = mlx_utils.MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ModuleNotFoundError:
        raise ValueError(
            f"model_type={model_type!r} is not an mlx-lm architecture (no mlx_lm.models.{name})"
        ) from None


def build_model(
    config: dict | str,
    *,
    seed: int = 0,
    dtype: mx.Dtype | None = None,
    weight_scale: float = 4.0,
    **overrides,
) -> nn.Module:
    """An mlx-lm model with random weights (seeded) from a config dict or a bundled architecture name.

    Args:
        config: a Hugging Face style config dict (needs `model_type`), or a bundled name such as "qwen3-0.6b".
        dtype: cast the parameters (default: MLX's float32).
        weight_scale: multiplies the `*_proj` weights after MLX's default init. With 1.0 the residual stream
            dominates a small random model, which then repeats its last input token whatever attention
            computes; 4.0 makes greedy tokens depend on attention (speed does not depend on the values).
        **overrides: config fields to change.

    Returns:
        the model, parameters evaluated.
    """
    if isinstance(config, str):
        from attnforge.models import load_config

        config = load_config(config, **overrides).to_dict()
    else:
        config = {**copy.deepcopy(config), **overrides}
    if "model_type" not in config:
        raise ValueError(f"config has no 'model_type' (keys: {sorted(config)})")
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers >= 5 nests it; most mlx-lm ModelArgs read the top level
        config.setdefault("rope_theta", rope["rope_theta"])
    module = model_module(config["model_type"])
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    if weight_scale != 1.0:
        scale = partial(_scaled_projection, weight_scale)
        model.update(tree_map_with_path(scale, model.parameters()))
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


# GGUF tensor names (llama.cpp) -> mlx-lm llama module paths.
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_ARCHITECTURES = ("llama",)
GGUF_TOKENIZERS = ("gpt2",)


def load_gguf(path: str | Path, *, dtype: mx.Dtype = mx.float32) -> tuple[nn.Module, TokenizerWrapper]:
    """A llama-architecture GGUF file as an mlx-lm llama model and tokenizer (offline).

    Quantized tensors (Q4_0, Q4_1, Q8_0) stay quantized (MLX's affine layout, group 32); llama.cpp stores
    q/k rows permuted for interleaved RoPE, so the model uses `rope_traditional=True`.

    Args:
        path: the .gguf file. dtype: of the norms, scales and biases, hence of the activations (float32 is
            fastest on MLX's CPU backend; float16 on a Mac).

    Returns:
        (model, tokenizer) as `mlx_lm.load` returns them.
    """
    weights, metadata = mx.load(str(path), return_metadata=True)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {architecture!r} is not supported; accepted: {GGUF_ARCHITECTURES}"
        )
    weights = {_mlx_name(name): _float_as(value, dtype) for name, value in weights.items()}
    module = model_module("llama")
    model = module.Model(_gguf_args(module, metadata, weights))
    nn.quantize(model, class_predicate=lambda p, m: _gguf_quantization(p, m, weights))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, _gguf_tokenizer(metadata, path)


def _mlx_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{suffix}"
    return f"{_GGUF_NAMES[stem]}.{suffix}"


def _float_as(value: mx.array, dtype: mx.Dtype) -> mx.array:
    return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value


def _gguf_args(module, metadata: dict, weights: dict):
    def get(key):
        return metadata[f"llama.{key}"].item()

    heads = get("attention.head_count")
    return module.ModelArgs(
        model_type="llama", hidden_size=get("embedding_length"), num_hidden_layers=get("block_count"),
        intermediate_size=get("feed_forward_length"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        vocab_size=weights["model.embed_tokens.weight"].shape[0], rope_theta=get("rope.freq_base"),
        head_dim=get("rope.dimension_count"), max_position_embeddings=get("context_length"),
        rope_traditional=True, tie_word_embeddings="lm_head.weight" not in weights,
    )  # fmt: skip


def _gguf_quantization(path: str, module: nn.Module, weights: dict) -> bool | dict:
    """Quantization of a layer: group = in-features / scales per row; bits = packed width / in-features."""
    scales = weights.get(f"{path}.scales")
    if scales is None:
        return False
    in_features = module.weight.shape[-1]
    packed = weights[f"{path}.weight"].shape[-1]
    return {"group_size": in_features // scales.shape[-1], "bits": packed * 32 // in_features}


def _gguf_tokenizer(metadata: dict, path) -> TokenizerWrapper:
    """The byte-level BPE tokenizer a GGUF describes (tokens, merges, control tokens, chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer {kind!r} is not supported; accepted: {GGUF_TOKENIZERS}")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    types = metadata["tokenizer.ggml.token_type"].tolist()
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == 3]  # 3: llama.cpp's CONTROL
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index.item()]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
    )  # fmt: skip
    return TokenizerWrapper(tokenizer)
