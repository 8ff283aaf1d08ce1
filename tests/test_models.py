"""Bundled architectures and the model loader (no downloads: configs are bundled, weights random)."""

import pytest
import torch

pytest.importorskip("transformers")
from attnforge import models  # noqa: E402

# name -> (model_type, query heads, key/value heads, head_dim, layers), as in the published config files
PUBLISHED = {
    "qwen3-0.6b": ("qwen3", 16, 8, 128, 28),
    "llama3-8b": ("llama", 32, 8, 128, 32),
    "llama2-7b": ("llama", 32, 32, 128, 32),  # MHA
}


def test_bundled_models_are_listed():
    assert set(PUBLISHED) <= set(models.bundled_models())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_configs_have_the_published_attention_shapes(name):
    config = models.load_config(name)
    model_type, heads, kv_heads, head_dim, layers = PUBLISHED[name]
    assert (config.model_type, config.num_attention_heads, config.num_key_value_heads) == (
        model_type, heads, kv_heads,
    )  # fmt: skip
    assert (config.head_dim, config.num_hidden_layers) == (head_dim, layers)


def test_build_model_with_overrides_is_seeded():
    options = dict(
        dtype=torch.float32, device="cpu", num_hidden_layers=1, vocab_size=64, intermediate_size=32
    )
    first = models.build_model("qwen3-0.6b", **options)
    second = models.build_model("qwen3-0.6b", **options)
    assert first.config.num_hidden_layers == 1 and first.config._attn_implementation == "sdpa"
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])


def test_loader_errors_name_the_value():
    with pytest.raises(ValueError, match=r"model='qwen9' is neither a bundled architecture \['"):
        models.load_config("qwen9")
    with pytest.raises(ValueError, match=r"num_layers=2: Qwen3Config has no field 'num_layers'"):
        models.load_config("qwen3-0.6b", num_layers=2)


def test_a_local_checkpoint_loads_with_its_weights(tmp_path):
    options = dict(
        dtype=torch.float32, device="cpu", num_hidden_layers=1, vocab_size=64, intermediate_size=32
    )
    built = models.build_model("qwen3-0.6b", **options)
    built.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert loaded.config.layer_types == ["full_attention"]
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[weight], built.state_dict()[weight])
