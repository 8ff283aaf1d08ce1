"""mlx-lm's conveniences through attnforge: caches (traps handled), recipes, convert, GGUF files, models."""

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as mlx_cache  # noqa: E402

from attnforge.integrations import mlx_models  # noqa: E402
from attnforge.integrations.mlx_models import (  # noqa: E402
    build_model,
    convert,
    generate,
    load_gguf,
    make_cache,
    quantize,
)

VOCAB = 384
TINY = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=64,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=True)  # fmt: skip
SLIDING = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
PROMPT = list(range(10, 30))


def tiny(family: str = "llama", **changes):
    return build_model({"model_type": family, **TINY, **changes})


def word_tokenizer():
    """A word-level tokenizer over VOCAB tokens "t0" ... (t1 is EOS), as transformers saves and loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t1", pad_token="t0")


def prompt_text() -> str:
    return " ".join(f"t{i}" for i in PROMPT)


def cache_types(cache) -> list[tuple[str, int | None]]:
    return [(type(layer).__name__, getattr(layer, "max_size", None)) for layer in cache]


# ----------------------------------------------------------------------------------------------------------
# make_cache: max_kv_size honoured for every model


def test_mlx_lm_ignores_max_kv_size_for_models_with_make_cache_and_make_cache_does_not():
    model = tiny("llama")  # llama defines make_cache
    assert (
        cache_types(mlx_cache.make_prompt_cache(model, max_kv_size=16)) == [("KVCache", None)] * 2
    )  # the trap
    assert cache_types(make_cache(model, max_kv_size=16)) == [("RotatingKVCache", 16)] * 2


def test_models_without_make_cache_get_mlx_lms_rotating_cache():
    assert cache_types(make_cache(tiny("qwen3"), max_kv_size=16)) == [("RotatingKVCache", 16)] * 2
    assert cache_types(make_cache(tiny("qwen3"))) == [("KVCache", None)] * 2


def test_sliding_window_layers_keep_the_smaller_bound():
    model = tiny("mistral", **SLIDING)
    assert cache_types(make_cache(model)) == [("RotatingKVCache", 8), ("KVCache", None)]
    assert cache_types(make_cache(model, max_kv_size=16)) == [("RotatingKVCache", 8), ("RotatingKVCache", 16)]
    assert cache_types(make_cache(model, max_kv_size=6)) == [("RotatingKVCache", 6), ("RotatingKVCache", 6)]


def test_a_bounded_cache_stays_bounded_during_generation():
    model = tiny("llama")
    cache = make_cache(model, max_kv_size=16)
    tokens = [token for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=12, prompt_cache=cache)]
    assert len(tokens) == 12
    assert cache[0].offset >= len(PROMPT) + 11 and cache[0].keys.shape[2] == 16  # 31+ tokens seen, 16 kept


class _Recurrent(nn.Module):
    """A model whose layer state cannot be bounded (like the SSM layers of hybrid models)."""

    def make_cache(self):
        return [mlx_cache.KVCache(), mlx_cache.ArraysCache(size=2)]


def test_max_kv_size_errors_name_the_value_and_what_is_accepted():
    for bad in (4, 0, "16", True):
        with pytest.raises(ValueError, match=rf"max_kv_size={bad!r} must be an integer > 4"):
            make_cache(tiny("llama"), max_kv_size=bad)
    with pytest.raises(ValueError, match=r"layer 1 uses ArraysCache; only KVCache and RotatingKVCache"):
        make_cache(_Recurrent(), max_kv_size=64)


# ----------------------------------------------------------------------------------------------------------
# generate: the cache options checked before anything runs


def test_generate_honours_max_kv_size_and_matches_mlx_lm_while_the_cache_is_not_full():
    model, tokenizer = tiny("llama"), word_tokenizer()
    plain = mlx_lm.generate(model, tokenizer, prompt_text(), max_tokens=5)
    assert generate(model, tokenizer, prompt_text(), max_tokens=5, max_kv_size=64) == plain
    assert len(plain.split()) == 5


def test_rotating_cache_with_kv_bits_is_refused_up_front():
    model, tokenizer = tiny("qwen3"), word_tokenizer()
    # mlx-lm itself only fails once quantization starts (quantized_kv_start tokens into the answer):
    with pytest.raises(NotImplementedError, match="RotatingKVCache Quantization NYI"):
        list(
            generate_step(
                mx.array(PROMPT), model, max_tokens=2, max_kv_size=16, kv_bits=4, quantized_kv_start=0
            )
        )
    with pytest.raises(ValueError, match=r"kv_bits=4 cannot be combined with max_kv_size=16: mlx-lm cannot "
                       r"quantize a RotatingKVCache .* not both"):  # fmt: skip
        generate(model, tokenizer, prompt_text(), max_tokens=2, max_kv_size=16, kv_bits=4)
    with pytest.raises(ValueError, match=r"kv_bits=4: layers \[0\] of this model use a RotatingKVCache"):
        generate(tiny("mistral", **SLIDING), tokenizer, prompt_text(), max_tokens=2, kv_bits=4)


def test_generate_with_kv_bits_quantizes_as_mlx_lm_does():
    model, tokenizer = tiny("llama"), word_tokenizer()
    options = dict(max_tokens=4, kv_bits=8, quantized_kv_start=0)
    assert generate(model, tokenizer, prompt_text(), **options) == mlx_lm.generate(
        model, tokenizer, prompt_text(), **options
    )


def test_cache_option_errors_name_the_value_and_the_accepted_ones():
    model, tokenizer = tiny("llama"), word_tokenizer()
    with pytest.raises(ValueError, match=r"kv_bits=7 is not supported; accepted: \(2, 3, 4, 5, 6, 8\)"):
        generate(model, tokenizer, prompt_text(), kv_bits=7)
    with pytest.raises(ValueError, match=r"kv_group_size=48 is not supported; accepted: \(32, 64, 128\)"):
        generate(model, tokenizer, prompt_text(), kv_bits=4, kv_group_size=48)


# ----------------------------------------------------------------------------------------------------------
# Quantization recipes and convert


def _bits_by_layer(config: dict) -> dict[str, int]:
    return {path: spec["bits"] for path, spec in config["quantization"].items() if isinstance(spec, dict)}


def test_quantize_by_recipe_gives_the_recipes_bits():
    assert mlx_models.QUANT_RECIPES == ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
    model = tiny("llama", num_hidden_layers=8, tie_word_embeddings=False)
    model, config = quantize(model, {}, recipe="mixed_3_6")
    bits = _bits_by_layer(config)
    # 6 bits: lm_head, v_proj and down_proj of the first and last eighth of the layers and every third between
    assert bits["lm_head"] == 6 and bits["model.layers.0.mlp.down_proj"] == 6
    assert bits["model.layers.3.mlp.down_proj"] == bits["model.layers.7.self_attn.v_proj"] == 6
    assert bits["model.layers.2.mlp.down_proj"] == bits["model.layers.3.self_attn.q_proj"] == 3
    assert model(mx.array([PROMPT])).shape == (1, len(PROMPT), VOCAB)


def test_quantize_uniformly_by_bits():
    model, config = quantize(tiny("qwen3"), {}, bits=8, group_size=32)
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert model.layers[0].self_attn.q_proj.bits == 8


class _NoDownProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(64, 64)]


def test_quantization_errors_name_the_value_and_the_accepted_ones():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"recipe='mixed_5_6' is not one of mlx-lm's recipes \('mixed_2_6'"):
        quantize(model, {}, recipe="mixed_5_6")
    with pytest.raises(ValueError, match=r"recipe='mixed_4_6' sets the bits of every layer; bits=4 would be"):
        quantize(model, {}, recipe="mixed_4_6", bits=4)
    with pytest.raises(ValueError, match=r"bits=7 is not supported; accepted: \(2, 3, 4, 5, 6, 8\)"):
        quantize(model, {}, bits=7)
    with pytest.raises(ValueError, match=r"group_size=48 is not supported; accepted: \(32, 64, 128\)"):
        quantize(model, {}, group_size=48)
    with pytest.raises(ValueError, match=r"recipe='mixed_2_6' needs MLP layers named 'down_proj'"):
        quantize(_NoDownProj(), {}, recipe="mixed_2_6")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint with a tokenizer, saved by transformers (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "rope_theta"}, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_convert_with_a_recipe_writes_a_model_mlx_lm_loads(hf_checkpoint, tmp_path):
    out = convert(hf_checkpoint, tmp_path / "mlx", recipe="mixed_4_6", group_size=32)
    model, tokenizer = mlx_lm.load(str(out))
    assert model.layers[1].mlp.down_proj.bits == 6 and model.layers[1].mlp.up_proj.bits == 4  # last eighth
    assert len(mlx_lm.generate(model, tokenizer, prompt_text(), max_tokens=3).split()) == 3


def test_convert_errors_name_the_value_and_the_accepted_ones(hf_checkpoint, tmp_path):
    with pytest.raises(
        ValueError, match=r"dtype='float64' is not one of \('float16', 'bfloat16', 'float32'\)"
    ):
        convert(hf_checkpoint, tmp_path / "a", dtype="float64")
    with pytest.raises(ValueError, match=r"mlx_path='.*' already exists; mlx-lm writes a new directory"):
        convert(hf_checkpoint, tmp_path)
    with pytest.raises(ValueError, match=r"recipe='q4_k_m' is not one of mlx-lm's recipes"):
        convert(hf_checkpoint, tmp_path / "b", recipe="q4_k_m")


# ----------------------------------------------------------------------------------------------------------
# Models: random weights from configs, GGUF files


def test_build_model_from_a_bundled_architecture():
    model = build_model(
        "qwen3-0.6b", num_hidden_layers=1, hidden_size=256, intermediate_size=256, vocab_size=512
    )
    attention = model.layers[0].self_attn
    assert (attention.n_heads, attention.n_kv_heads, attention.q_proj.weight.shape) == (16, 8, (2048, 256))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


def test_build_model_errors_name_the_value():
    with pytest.raises(ValueError, match=r"config has no 'model_type' \(keys: \['hidden_size'\]\)"):
        build_model({"hidden_size": 64})
    with pytest.raises(ValueError, match=r"model_type='transformer-xl' is not an mlx-lm architecture"):
        build_model({"model_type": "transformer-xl"})


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def _gguf_name(path: str) -> str:
    if path.startswith("model.layers."):
        _, _, layer, rest = path.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}[path.rsplit(".", 1)[0]] + (
        "." + path.rsplit(".", 1)[1]
    )


def _gguf_metadata(architecture="llama", tokenizer="gpt2") -> dict:
    u32 = lambda value: mx.array(value, dtype=mx.uint32)  # noqa: E731
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "w", "1", "w1"] + [
        f"x{i}" for i in range(VOCAB - 6)
    ]
    return {
        "general.architecture": architecture, "llama.embedding_length": u32(128), "llama.block_count": u32(2),
        "llama.feed_forward_length": u32(256), "llama.attention.head_count": u32(2),
        "llama.attention.head_count_kv": u32(1), "llama.attention.layer_norm_rms_epsilon": mx.array(1e-6),
        "llama.rope.freq_base": mx.array(10000.0), "llama.rope.dimension_count": u32(64),
        "llama.context_length": u32(256), "tokenizer.ggml.model": tokenizer, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["w 1"],
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (VOCAB - 3)),
        "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
    }  # fmt: skip


def _gguf_tensors(model) -> dict:
    return {_gguf_name(path): value for path, value in tree_flatten(model.parameters())}


def test_load_gguf_rebuilds_a_llama_file_exactly(tmp_path):
    # GGUF llama stores q/k rows for interleaved RoPE: the loaded model uses rope_traditional=True.
    reference = tiny("llama", rope_traditional=True)
    mx.save_gguf(str(tmp_path / "tiny.gguf"), _gguf_tensors(reference), _gguf_metadata())
    model, tokenizer = load_gguf(tmp_path / "tiny.gguf")
    tokens = mx.array([PROMPT])
    assert mx.array_equal(model(tokens), reference(tokens))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.encode("<|im_start|>") == [1]


def test_load_gguf_keeps_quantized_tensors_quantized(monkeypatch, tmp_path):
    # mx.save_gguf cannot write quantized tensors: stand in for what mx.load returns for a Q4_1/Q8_0 file.
    reference = tiny("llama", rope_traditional=True)
    quantizable = lambda path, module: hasattr(module, "to_quantized") and "down_proj" not in path  # noqa: E731
    nn.quantize(reference, group_size=32, bits=4, class_predicate=quantizable)
    reference.layers[1].self_attn.v_proj = nn.Linear(128, 64, bias=False).to_quantized(group_size=32, bits=8)
    tensors, metadata = _gguf_tensors(reference), _gguf_metadata()
    monkeypatch.setattr(mlx_models.mx, "load", lambda path, return_metadata: (tensors, metadata))
    model, _ = load_gguf(tmp_path / "stand-in.gguf")
    assert model.layers[0].self_attn.q_proj.bits == 4 and model.model.embed_tokens.group_size == 32
    assert model.layers[1].self_attn.v_proj.bits == 8  # bits read per tensor (Q8_0 next to Q4_1)
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)  # stored unquantized, loaded unquantized
    tokens = mx.array([PROMPT])
    assert mx.array_equal(model(tokens), reference(tokens))


def test_load_gguf_errors_name_the_value_and_the_accepted_ones(tmp_path):
    weights = {"token_embd.weight": mx.zeros((VOCAB, 128))}
    mx.save_gguf(str(tmp_path / "gpt2.gguf"), weights, _gguf_metadata(architecture="gpt2"))
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; accepted: \('llama',\)"):
        load_gguf(tmp_path / "gpt2.gguf")
    mx.save_gguf(str(tmp_path / "spm.gguf"), _gguf_tensors(tiny("llama")), _gguf_metadata(tokenizer="llama"))
    with pytest.raises(ValueError, match=r"tokenizer 'llama' is not supported; accepted: \('gpt2',\)"):
        load_gguf(tmp_path / "spm.gguf")
