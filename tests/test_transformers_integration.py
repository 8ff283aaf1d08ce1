"""attnforge inside transformers: every family in the table, tiny random configs, fp32 on CPU.

On CPU tests/conftest.py sets TRITON_INTERPRET=1, so the Triton kernels really run (through the interpreter)
and the optimizer's statistics show which ones did: a test that only exercised the torch fallback would prove
nothing about the kernels.
"""

import gc
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import attnforge as af  # noqa: E402
from attnforge.integrations import transformers as integration  # noqa: E402
from attnforge.optimizer import get_optimizer  # noqa: E402

VOCAB = 96
PROMPT = 20  # > 16: the prompt goes to the prefill kernel, each new token to the decode kernel
NEW_TOKENS = 5
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=0)  # fmt: skip
# model_type -> config overrides for a tiny model of that family with attnforge's fast path.
FAMILY_CONFIGS = {
    "qwen3": {},
    "qwen2": {},
    "llama": {},
    "mistral": {"sliding_window": None},
    "gemma": {"num_key_value_heads": 1},  # MQA
    "phi3": {"num_key_value_heads": 4},  # MHA
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
}
LOGITS_RTOL = 1e-5
# Kernels run on a GPU, or on the CPU through the interpreter (conftest.py sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(model_type: str, attn_implementation: str = "eager", **overrides):
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILY_CONFIGS.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).to(DEVICE).eval()


def available_kernels() -> set[str]:
    return {kind for kind in ("decode", "prefill") if importlib.util.find_spec(f"attnforge.kernels.{kind}")}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def greedy(model, ids, mask=None, **options):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **options)


@pytest.fixture(autouse=True)
def clean_state():
    """Each test starts unpatched with fresh optimizer statistics, and leaves transformers as it found it.

    On a GPU the tuning table may not cover these tiny shapes: require_measurement=False lets kernels run.
    """
    get_optimizer().reset()
    af.configure_optimizer(require_measurement=False)
    yield
    gc.collect()  # models patched by the test are gone, so unpatching can drop the registrations
    integration.unpatch_transformers()
    af.configure_optimizer(require_measurement=True)
    get_optimizer().reset()


@pytest.fixture
def prompts():
    generator = torch.Generator().manual_seed(1)
    # no pad/bos/eos ids, or generate() would infer padding
    ids = torch.randint(3, VOCAB - 1, (2, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the first sequence is 3 tokens shorter
    return ids.to(DEVICE), mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# Equality with eager, per family


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_family_matches_eager_with_kernels_on(model_type, prompts):
    ids, mask = prompts
    model = tiny_model(model_type)
    with torch.no_grad():
        ref_logits = model(ids).logits
    expected = {
        "dynamic": greedy(model, ids),
        "static": greedy(model, ids, cache_implementation="static"),
        "left-padded": greedy(model, ids, mask),
        "left-padded static": greedy(model, ids, mask, cache_implementation="static"),
    }

    assert af.patch_model(model)
    assert model.config._attn_implementation == "attnforge"
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, ref_logits) <= LOGITS_RTOL
    got = {
        "dynamic": greedy(model, ids),
        "static": greedy(model, ids, cache_implementation="static"),
        "left-padded": greedy(model, ids, mask),
        "left-padded static": greedy(model, ids, mask, cache_implementation="static"),
    }
    for case, tokens in expected.items():
        assert torch.equal(got[case], tokens), f"{model_type}, {case} cache: tokens differ from eager"

    stats = af.get_integration_status()["optimizer_stats"]
    assert stats["calls"] > 0
    assert "decode" in available_kernels(), "the decode kernel module is missing"
    for kind in available_kernels():
        assert stats["by_kernel"].get(kind, 0) > 0, f"the {kind} kernel never ran: {stats}"
    af.unpatch_model(model)
    assert model.config._attn_implementation == "eager"


def test_sliding_window_layers_carry_a_mask_and_stay_correct(prompts):
    ids, _ = prompts
    model = tiny_model("mistral", sliding_window=4)  # the window binds
    with torch.no_grad():
        ref_logits = model(ids).logits
    expected = greedy(model, ids)
    af.patch_model(model)
    with torch.no_grad():
        assert relative_error(model(ids).logits, ref_logits) <= LOGITS_RTOL
    assert torch.equal(greedy(model, ids), expected)
    stats = get_optimizer().get_stats()
    assert stats["by_kernel"].get("decode", 0) == 0, "a decode kernel cannot apply a sliding window"


def test_gemma3_full_layers_decode_and_sliding_layers_carry_a_mask(prompts):
    ids, _ = prompts
    model = tiny_model("gemma3_text")
    af.patch_model(model)
    greedy(model, ids[:, :9])  # a 9-token prompt: the decode kernel takes up to 16 new tokens
    stats = get_optimizer().get_stats()
    # The full-attention layer runs the decode kernel for the prompt and each step. The sliding-window layer
    # carries a mask, which the decode kernel does not take: prefill kernel (it takes masks) or torch SDPA.
    assert stats["calls"] == 2 * NEW_TOKENS
    assert stats["by_kernel"].get("decode", 0) == NEW_TOKENS


# ----------------------------------------------------------------------------------------------------------
# Families with an explicit fallback


def tiny_deepseek_v3():
    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(DEVICE).eval()


@pytest.mark.parametrize("model_type, reason", [("gemma2", "softcapping"), ("deepseek_v3", "MLA")])
def test_unsupported_families_are_not_patched(model_type, reason):
    model = tiny_deepseek_v3() if model_type == "deepseek_v3" else tiny_model("gemma2")
    supported, note = af.family_support(model)
    assert not supported and reason in note
    assert af.patch_model(model) is False
    assert model.config._attn_implementation == "eager"
    af.patch_transformers()
    fresh = (
        tiny_deepseek_v3() if model_type == "deepseek_v3" else tiny_model("gemma2", attn_implementation=None)
    )
    assert fresh.config._attn_implementation != "attnforge"


@pytest.mark.parametrize("model_type", ["gemma2", "deepseek_v3"])
def test_forcing_attnforge_on_unsupported_families_is_still_correct(model_type, prompts):
    """Softcapping runs in torch math; MLA's unequal head dims go to torch SDPA: both match eager."""
    ids, _ = prompts
    model = tiny_deepseek_v3() if model_type == "deepseek_v3" else tiny_model("gemma2")
    with torch.no_grad():
        ref = model(ids).logits
    integration.patch_transformers()
    model.set_attn_implementation("attnforge")
    with torch.no_grad():
        assert relative_error(model(ids).logits, ref) <= LOGITS_RTOL


# ----------------------------------------------------------------------------------------------------------
# Patching and unpatching


def test_patch_transformers_makes_new_models_default_to_attnforge_and_unpatch_restores():
    before_attention = dict(AttentionInterface._global_mapping)
    before_masks = dict(AttentionMaskInterface._global_mapping)
    families = af.patch_transformers()
    assert families == sum(f.supported for f in integration.FAMILIES.values()) >= 7
    assert af.get_integration_status()["is_patched"]
    assert tiny_model("qwen3", attn_implementation=None).config._attn_implementation == "attnforge"
    assert tiny_model("qwen3", attn_implementation="eager").config._attn_implementation == "eager"
    af.unpatch_transformers()
    assert not af.get_integration_status()["is_patched"]
    assert AttentionInterface._global_mapping == before_attention
    assert AttentionMaskInterface._global_mapping == before_masks
    assert tiny_model("qwen3", attn_implementation=None).config._attn_implementation == "sdpa"


def test_optimized_context_manager(prompts):
    ids, _ = prompts
    with af.optimized():
        assert af.get_integration_status()["is_patched"]
        model = tiny_model("llama", attn_implementation=None)
        assert model.config._attn_implementation == "attnforge"
    assert not af.get_integration_status()["is_patched"]
    other = tiny_model("llama")
    with af.optimized(other):
        assert other.config._attn_implementation == "attnforge"
        greedy(other, ids)
    assert other.config._attn_implementation == "eager"
    assert get_optimizer().get_stats()["calls"] > 0


def test_unpatch_keeps_registration_while_a_patched_model_lives():
    gc.collect()
    model = tiny_model("qwen3")
    af.patch_transformers()
    af.patch_model(model)
    af.unpatch_transformers()
    assert "attnforge" in AttentionInterface._global_mapping
    af.unpatch_model(model)
    assert "attnforge" not in AttentionInterface._global_mapping


def test_status_lists_every_family_with_a_reason():
    status = af.get_integration_status()
    assert set(status["families"]) >= {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3",
                                       "gemma3_text", "phi3", "deepseek_v3"}  # fmt: skip
    assert all(entry["note"] for entry in status["families"].values())
    assert {"calls", "optimized", "fallbacks", "optimization_rate"} <= set(status["optimizer_stats"])


def test_unknown_family_is_not_patched():
    supported, note = af.family_support("bert")
    assert not supported and "model_type='bert' is not in attnforge's family table" in note


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: af.patch_model(None), r"patch_model expects a transformers PreTrainedModel, got NoneType$"),
        (lambda: af.patch_model("qwen3-0.6b"),
         r"patch_model expects a transformers PreTrainedModel, got str \('qwen3-0.6b': load_and_patch_model"),
        (lambda: af.unpatch_model(None),
         r"unpatch_model expects a transformers PreTrainedModel, got NoneType$"),
        (lambda: af.optimized("qwen3-0.6b").__enter__(),
         r"optimized expects a transformers PreTrainedModel or None, got str"),
    ],
)  # fmt: skip
def test_patching_something_that_is_not_a_model_names_what_is_expected(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_a_config_reused_from_an_earlier_model_gets_attnforge_after_patching(caplog):
    """transformers stores the implementation it picked ("sdpa") on the config; reusing that config after
    patch_transformers() must not silently stay on sdpa."""
    config = AutoConfig.for_model("qwen3", **TINY)
    assert AutoModelForCausalLM.from_config(config).config._attn_implementation == "sdpa"
    original_property = PretrainedConfig.__dict__["_attn_implementation"]
    af.patch_transformers()
    try:
        with caplog.at_level("WARNING", logger="attnforge.integrations.transformers"):
            reused = AutoModelForCausalLM.from_config(config)
        assert reused.config._attn_implementation == "attnforge"
        assert "instead of the 'sdpa' its config carries" in caplog.text
        assert "pass attn_implementation='sdpa' when loading to keep it" in caplog.text
        # a choice made while patched is explicit, and stays when its config is reused
        kept = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        assert kept.config._attn_implementation == "eager"
        assert AutoModelForCausalLM.from_config(config).config._attn_implementation == "eager"
        assert tiny_model("qwen3", attn_implementation="sdpa").config._attn_implementation == "sdpa"
    finally:
        af.unpatch_transformers()
    assert PretrainedConfig.__dict__["_attn_implementation"] is original_property


# ----------------------------------------------------------------------------------------------------------
# The mask function: what it hands the attention function


MASK_CONFIG = AutoConfig.for_model("qwen3", **TINY)


def hook(**arguments):
    """attnforge_mask called as transformers calls it for a tiny fp32 qwen3 on this device."""
    return integration.attnforge_mask(config=MASK_CONFIG, dtype=torch.float32, device=DEVICE, **arguments)


def test_mask_function_returns_valid_ranges_for_causal_and_left_padding():
    # StaticCache: a 32-slot buffer holding 10 tokens after this step
    ends = hook(batch_size=2, q_length=1, kv_length=32, q_offset=torch.tensor(9))
    assert ends.dtype == torch.int32 and ends.flatten().tolist() == [10, 10]
    # DynamicCache: attention gets exactly the valid keys, so plain causal needs no mask at all
    assert hook(batch_size=2, q_length=1, kv_length=10, q_offset=9) is None
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    ranges = hook(batch_size=2, q_length=5, kv_length=5, attention_mask=padding)
    assert ranges.reshape(2, 2).tolist() == [[2, 5], [0, 5]]


def test_mask_function_falls_back_to_a_full_mask_for_right_padding():
    padding = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool, device=DEVICE)
    mask = hook(batch_size=1, q_length=5, kv_length=5, attention_mask=padding)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 5, 5)
    assert not mask[0, 0, 4, 3] and mask[0, 0, 2, 1] and not mask[0, 0, 1, 2]


@pytest.mark.parametrize(
    "arguments",
    [
        dict(batch_size=2, q_length=1, kv_length=32, q_offset=torch.tensor(9)),
        dict(batch_size=1, q_length=5, kv_length=5, attention_mask=torch.tensor([[0, 1, 1, 1, 1]])),
        dict(batch_size=1, q_length=3, kv_length=8, q_offset=torch.tensor(5)),
    ],
    ids=["static-decode", "left-padding", "static-chunk"],
)
def test_mask_function_returns_transformers_own_mask_where_torch_runs(arguments):
    """Calls the optimizer sends to torch get exactly the mask transformers' sdpa would have built."""
    from transformers.masking_utils import sdpa_mask

    arguments = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    af.configure_optimizer(kernels=())
    try:
        got = hook(**arguments)
    finally:
        af.configure_optimizer(kernels=("decode", "prefill"))
    expected = sdpa_mask(**arguments, config=MASK_CONFIG, dtype=torch.float32, device=DEVICE)
    assert got is None if expected is None else torch.equal(got, expected)


def test_attention_calls_transformers_sdpa_where_torch_runs(monkeypatch):
    """A call routed to torch runs transformers' own sdpa_attention_forward with the same arguments, and is
    counted as a fallback with its reason."""
    seen = []
    original = integration.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(integration, "sdpa_attention_forward", spy)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, kv = torch.randn(1, 4, 3, 64, device=DEVICE), torch.randn(1, 2, 3, 64, device=DEVICE)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE).tril()
    af.configure_optimizer(kernels=())
    get_optimizer().reset_stats()
    try:
        out, _ = integration.attnforge_attention(module, q, kv, kv, mask, scaling=0.125, sliding_window=None)
    finally:
        af.configure_optimizer(kernels=("decode", "prefill"))
    expected, _ = original(module, q, kv, kv, mask, scaling=0.125)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert seen[0][0] is mask and seen[0][1]["scaling"] == 0.125 and "sliding_window" in seen[0][1]
    assert get_optimizer().get_stats()["fallback_reasons"] == {"kernel disabled": 1}


def test_attention_rejects_features_it_cannot_serve():
    q = torch.randn(1, 4, 3, 64)
    kv = torch.randn(1, 2, 3, 64)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="does not support s_aux"):
        integration.attnforge_attention(module, q, kv, kv, None, s_aux=torch.zeros(4))


def test_torch_compile_matches_eager(prompts):
    """The compiled forward (fullgraph: no graph break in attnforge's path) matches eager with a static
    cache, unpadded then left-padded. Inside a compiled graph a padding mask cannot be read, so those calls
    run transformers' own sdpa attention; calls without one (a plain forward) still reach the kernels."""
    ids, mask = prompts
    model = tiny_model("qwen3")
    expected = greedy(model, ids, cache_implementation="static")
    expected_padded = greedy(model, ids, mask, cache_implementation="static")
    with torch.no_grad():
        expected_logits = model(ids[:, :9]).logits
    af.patch_model(model)
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(greedy(model, ids, cache_implementation="static"), expected)
    assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), expected_padded)
    get_optimizer().reset_stats()
    with torch.no_grad():
        logits = model(ids[:, :9]).logits  # 9 tokens, no cache: the decode kernel, chosen when the graph runs
    assert relative_error(logits, expected_logits) <= LOGITS_RTOL
    assert get_optimizer().get_stats()["by_kernel"].get("decode", 0) >= 1, get_optimizer().get_stats()


def test_generate_own_compile_with_a_static_cache(prompts):
    """transformers compiles the decode step itself for a static cache (on GPUs by default; forced here):
    the same tokens as without attnforge, every call through transformers' own sdpa (a padding mask cannot
    be read inside the graph)."""
    from transformers import CompileConfig

    ids, _ = prompts
    model = tiny_model("llama")
    expected = greedy(model, ids, cache_implementation="static")
    af.patch_model(model)
    config = CompileConfig(backend="aot_eager")
    config._compile_all_devices = True  # CPU: transformers compiles only on accelerators unless told
    for _ in range(2):
        assert torch.equal(greedy(model, ids, cache_implementation="static", compile_config=config), expected)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_decode_steps_stay_on_the_decode_kernel(prompts, cache):
    """With left padding the first valid key travels as kv_starts: every decode step runs the decode kernel
    (not the prefill kernel with a mask), and the tokens equal eager's."""
    ids, mask = prompts
    model = tiny_model("llama")
    options = {} if cache == "dynamic" else {"cache_implementation": "static"}
    expected = greedy(model, ids, mask, **options)
    assert af.patch_model(model)
    get_optimizer().reset()
    assert torch.equal(greedy(model, ids, mask, **options), expected)
    stats = af.get_integration_status()["optimizer_stats"]
    layers, steps = model.config.num_hidden_layers, expected.shape[1] - ids.shape[1] - 1
    if cache == "static" and DEVICE == "cuda":
        steps = 1  # generate() replays compiled steps as a CUDA graph: calls are counted while it is recorded
    assert stats["by_kernel"].get("decode", 0) >= layers * steps, stats
    assert stats["by_kernel"].get("prefill", 0) == layers, stats  # the prompt only
