"""Bundled architectures and the model loader (no downloads: configs are bundled, weights random)."""

import socket
import time

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
    with pytest.raises(models.ModelNotFoundError, match=r"model='qwen9' is not a bundled architecture \("):
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


# ----------------------------------------------------------------------------------------------------------
# Where a name loads from, decided at once (no hub retries)

BUNDLED = r"\(llama2-7b, llama3-8b, qwen3-0.6b"


def test_model_source_of_bundled_names_and_local_paths(tmp_path):
    assert models.model_source("qwen3-0.6b") == "bundled"
    assert models.model_source(str(tmp_path)) == "local" and models.model_source(tmp_path) == "local"


def test_a_name_that_is_not_a_hub_id_fails_at_once_without_the_hub(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda: pytest.fail("the hub must not be asked"))
    message = rf"model='nosuchmodel' is not a bundled architecture {BUNDLED}.*\) or an existing local path; "
    message += r"a hub id \(owner/name\) needs a local copy, as attnforge runs offline"
    start = time.perf_counter()
    for load in (models.model_source, models.load_config, models.load_model):
        with pytest.raises(models.ModelNotFoundError, match=message):
            load("nosuchmodel")
    assert time.perf_counter() - start < 1.0


def test_a_hub_id_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", lambda: pytest.fail("offline: the hub must not be asked"))
    message = rf"model='owner/nosuch' is not a bundled architecture {BUNDLED}.*local Hugging Face cache, "
    message += r"and the hub cannot be reached from here \(offline\): download it where there is a network"
    with pytest.raises(models.ModelNotFoundError, match=message):
        models.load_model("owner/nosuch")


def test_a_hub_id_fails_within_the_probe_timeout_when_the_hub_is_unreachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(models.ModelNotFoundError, match=r"the hub cannot be reached from here"):
        models.model_source("owner/nosuch")
    assert time.perf_counter() - start < models.HUB_PROBE_TIMEOUT_S + 0.5


def test_a_hub_id_in_the_local_cache_or_with_a_reachable_hub_is_accepted(monkeypatch):
    monkeypatch.setattr(models, "_in_hub_cache", lambda model: model == "owner/cached")
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    assert models.model_source("owner/cached") == "cache"
    assert models.model_source("owner/remote") == "hub"


def test_hub_probe_sees_a_listening_endpoint(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models._hub_reachable()


def test_model_source_refuses_non_strings():
    with pytest.raises(TypeError, match=r"model must be a name or path \(str\), got NoneType"):
        models.model_source(None)
