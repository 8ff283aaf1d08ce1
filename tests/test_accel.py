"""The accelerator against plain transformers: tiny random models of every supported family, fp32 on CPU.

On CPU tests/conftest.py sets TRITON_INTERPRET=1, so the decode and prefill kernels really run (through the
interpreter) and the step runs eagerly (graph: "skipped: no CUDA device"); that is the path checked here
against `model.generate()` (dynamic cache, sdpa, no attnforge). The GPU tests at the end need CUDA.
"""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import attnforge as af  # noqa: E402
from attnforge.accel import CacheTooLargeError, UnsupportedModelError, accelerate  # noqa: E402
from attnforge.accel import cache as cache_module  # noqa: E402
from attnforge.kernels import decode, decode_step, rope_cache  # noqa: E402

VOCAB = 96
NEW = 6
# initializer_range 0.2: logits far from uniform, so greedy tokens vary (a degenerate model repeats one token)
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
            bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=0)  # fmt: skip
FAMILIES = {
    "qwen3": {},
    "qwen2": {},
    "llama": {},
    "mistral": {"sliding_window": None},
    "gemma": {"num_key_value_heads": 1},  # MQA, (1 + w) norms, scaled embedding, GELU
    "phi3": {"num_key_value_heads": 4},  # MHA, checkpoint-fused qkv and gate_up
}
DYNAMIC_ROPE = {
    "rope_type": "dynamic",
    "factor": 2.0,
    "rope_theta": 1e4,
    "original_max_position_embeddings": 64,
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(model_type: str = "qwen3", **overrides):
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILIES.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE).eval()


def prompt(length: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (length,), generator=generator).tolist()


def reference(model, tokens: list[int], new: int = NEW, **options) -> list[int]:
    """Greedy tokens of plain transformers (dynamic cache), stopping at EOS as generate() does."""
    ids = torch.tensor([tokens], device=DEVICE)
    options.setdefault("min_new_tokens", new)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, **options)  # fmt: skip
    return out[0, len(tokens) :].tolist()


@pytest.fixture(scope="module")
def qwen3():
    model = tiny_model("qwen3")
    return model, accelerate(model, max_batch_size=4)


# ----------------------------------------------------------------------------------------------------------
# Greedy tokens identical to transformers


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(model_type):
    model = tiny_model(model_type)
    tokens = prompt(19)
    expected = reference(model, tokens)
    with torch.no_grad():
        expected_logits = model(torch.tensor([tokens], device=DEVICE)).logits[0, -1]
    acc = accelerate(model)
    assert acc.info["attention"].startswith("attnforge kernels")
    assert acc.info["projections"].startswith("attnforge fused_linear")
    result = acc.generate(tokens, max_new_tokens=NEW, ignore_eos=True)
    assert result.tokens == [expected], f"{model_type}: tokens differ from model.generate()"
    assert result.finish_reasons == ["length"]
    # the model is unchanged by the fusing: its own forward gives the same logits as before
    with torch.no_grad():
        after = model(torch.tensor([tokens], device=DEVICE)).logits[0, -1]
    assert torch.equal(after, expected_logits)


def test_the_walk_gives_the_models_own_logits(qwen3):
    model, acc = qwen3
    tokens = prompt(23, seed=5)
    ids = torch.tensor([tokens], device=DEVICE)
    with torch.no_grad():
        expected = model(ids).logits[0, -1].float()
    lens = torch.tensor([len(tokens)], device=DEVICE)
    positions = torch.arange(len(tokens), device=DEVICE)[None]
    with torch.no_grad():
        logits = acc.walk.logits(ids, positions, lens, lens, len(tokens), last_rows=lens - 1)[0]
    acc.reset()  # the call wrote row 0 of the cache behind the accelerator's back
    assert float((logits - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_fused_projections_share_the_models_storage(qwen3):
    model, acc = qwen3
    attention = model.model.layers[0].self_attn
    fused = acc.plan.layers[0].qkv_weight
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attention.k_proj.weight.data_ptr() == fused.data_ptr() + attention.q_proj.weight.numel() * 4
    again = accelerate(model)  # a second accelerator finds them fused and copies nothing
    assert again.plan.layers[0].qkv_weight.data_ptr() == fused.data_ptr()


def test_a_ragged_batch_equals_each_prompt_alone(qwen3):
    model, acc = qwen3
    prompts = [prompt(5, seed=2), prompt(20, seed=3), prompt(11, seed=4)]
    result = acc.generate(prompts, max_new_tokens=NEW, ignore_eos=True)
    assert result.tokens == [reference(model, p) for p in prompts]
    assert result.metrics.prompt_tokens == [5, 20, 11]
    assert result.metrics.new_tokens == [NEW] * 3


def test_torch_attention_gives_the_same_tokens(qwen3):
    model, acc = qwen3
    prompts = [prompt(7, seed=6), prompt(15, seed=7)]
    torch_side = accelerate(model, max_batch_size=2, attention="torch")
    assert torch_side.info["attention"].startswith("torch sdpa")
    kernels = acc.generate(prompts, max_new_tokens=NEW, ignore_eos=True).tokens
    assert torch_side.generate(prompts, max_new_tokens=NEW, ignore_eos=True).tokens == kernels


def test_torch_projections_give_the_same_tokens(qwen3):
    model, acc = qwen3
    torch_side = accelerate(model, projections="torch")
    assert torch_side.info["projections"].startswith("the model's modules")
    for seed in (8,):  # one sequence: its decode steps' products go through fused_linear (any GPU)
        kernels = acc.generate(prompt(9 + seed, seed=seed), max_new_tokens=NEW, ignore_eos=True).tokens
        assert (
            torch_side.generate(prompt(9 + seed, seed=seed), max_new_tokens=NEW, ignore_eos=True).tokens
            == kernels
        )


def test_the_new_token_in_one_kernel_gives_the_two_kernel_tokens(qwen3, monkeypatch):
    """A decode step's new token goes through decode_step_attention (q/k norms, RoPE, cache write and
    attention in one launch); with `fuse_new_token` off, through rope_and_store then decode_attention. The
    launches are counted in Python: no CUDA graph (a replay calls no Python; on a GPU the fixture's
    accelerator may have captured its graph in an earlier test)."""
    model, _ = qwen3
    acc = accelerate(model, max_batch_size=2, cuda_graph=False)
    two = accelerate(model, max_batch_size=2, cuda_graph=False)
    two.walk.attention.fuse_new_token = False
    calls = {"step": 0, "rope": 0}

    def counted(key, launch):
        def launch_and_count(*args):
            calls[key] += 1
            return launch(*args)

        return launch_and_count

    for module, name, key in ((decode_step, "launch_decode_step", "step"),
                              (rope_cache, "launch_rope_and_store", "rope")):  # fmt: skip
        monkeypatch.setattr(module, name, counted(key, getattr(module, name)))
    prompts = [prompt(6, seed=2), prompt(11, seed=3)]
    fused = acc.generate(prompts, max_new_tokens=NEW, ignore_eos=True).tokens
    assert calls == {"step": (NEW - 1) * model.config.num_hidden_layers, "rope": 0}
    assert two.generate(prompts, max_new_tokens=NEW, ignore_eos=True).tokens == fused
    assert calls["rope"] == (NEW - 1) * model.config.num_hidden_layers


def test_the_bench_row_with_torch_projections_uses_the_models_matmuls():
    from attnforge.accel.benchmark import Contenders

    contenders = Contenders(tiny_model(), 1, 64, on_gpu=False)
    assert contenders.accelerator.info["projections"].startswith("attnforge fused_linear")
    assert contenders.get("attnforge-torch-projections").info["projections"].startswith("the model's modules")


@pytest.mark.parametrize(("model_type", "fused"), [("llama", True), ("qwen3", True), ("gemma", False)])
def test_norms_and_activation_are_fused_only_where_probed_equal(model_type, fused):
    projections = accelerate(tiny_model(model_type)).walk.projections
    layer = projections.layers[0]
    # Gemma: (1 + w) norms and GELU run as the model's own modules before the kernel's product
    assert (layer.input_norm is not None, layer.post_norm is not None, layer.silu) == (fused, fused, fused)
    assert (projections.final_norm is not None) == fused
    # every family here rotates the whole head the rotate-half way: one kernel for norms, RoPE and cache write
    assert projections.rope is not None
    q_norm, k_norm = projections.qk_norms[0]
    assert (q_norm is not None, k_norm is not None) == (
        (True, True) if model_type == "qwen3" else (False, False)
    )


def test_generation_stops_at_eos_as_transformers_does(qwen3):
    model, acc = qwen3
    tokens = prompt(12, seed=8)
    free = acc.generate(tokens, max_new_tokens=NEW, ignore_eos=True).tokens[0]
    eos = free[2]  # the third greedy token: declare it the end-of-sequence token
    result = acc.generate(tokens, max_new_tokens=NEW, eos_token_id=eos)
    assert result.tokens[0] == free[: free.index(eos) + 1]
    assert result.finish_reasons == ["eos"]
    assert result.tokens[0] == reference(model, tokens, eos_token_id=eos, min_new_tokens=0)


def test_a_batch_keeps_going_until_every_sequence_ended(qwen3):
    _, acc = qwen3
    prompts = [prompt(9, seed=9), prompt(14, seed=10)]
    free = acc.generate(prompts, max_new_tokens=NEW, ignore_eos=True).tokens
    eos = free[0][1]
    result = acc.generate(prompts, max_new_tokens=NEW, eos_token_id=eos)
    assert result.tokens[0] == free[0][: free[0].index(eos) + 1]
    assert result.finish_reasons[0] == "eos"
    assert result.tokens[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_a_continued_conversation_reuses_the_cache_and_gives_the_same_tokens(qwen3):
    _, acc = qwen3
    first = prompt(10, seed=11)
    answer = acc.generate(first, max_new_tokens=NEW, ignore_eos=True)
    assert answer.metrics.reused_tokens == 0
    follow_up = first + answer.tokens[0] + [5, 6, 7]
    continued = acc.generate(follow_up, max_new_tokens=NEW, ignore_eos=True)
    # the prompt, and the answer tokens fed back as decode inputs, were in the cache
    assert continued.metrics.reused_tokens == len(first) + NEW - 1
    acc.reset()
    fresh = acc.generate(follow_up, max_new_tokens=NEW, ignore_eos=True)
    assert fresh.metrics.reused_tokens == 0
    assert continued.tokens == fresh.tokens
    acc.generate([prompt(4, seed=12), prompt(4, seed=13)], max_new_tokens=2)  # a batch overwrites row 0
    assert acc.generate(follow_up, max_new_tokens=2).metrics.reused_tokens == 0


def test_stream_yields_each_token_with_live_metrics(qwen3):
    _, acc = qwen3
    tokens = prompt(8, seed=14)
    events = list(acc.stream(tokens, max_new_tokens=4, ignore_eos=True))
    assert [e.sequence for e in events] == [0, 0, 0, 0]
    assert [e.metrics.new_tokens[0] for e in events] == [1, 2, 3, 4]
    assert events[0].metrics.ttft_s > 0 and events[0].metrics.decode_tok_s is None
    last = events[-1].metrics
    assert last.decode_steps == 3 and last.decode_tok_s > 0
    weights = acc.weight_bytes
    kv_per_token = acc.cache.shape.bytes_per_token()
    # each step reads the weights and the valid keys/values: 9, 10, 11 tokens after the 8-token prompt
    assert last.bytes_per_step == pytest.approx(weights + kv_per_token * (9 + 10 + 11) / 3)
    assert last.bandwidth_gb_s == pytest.approx(last.bytes_per_step * 3 / last.decode_s / 1e9)
    assert [e.finish_reason for e in events] == [None, None, None, "length"]


def test_dtype_casts_the_model_and_the_cache():
    model = tiny_model("llama")
    acc = accelerate(model, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert acc.cache.keys[0].dtype == torch.bfloat16 and acc.info["dtype"] == "bfloat16"
    result = acc.generate(prompt(6), max_new_tokens=3, ignore_eos=True)
    assert len(result.tokens[0]) == 3


def test_without_a_gpu_the_graph_and_compile_are_skipped_with_the_reason(qwen3):
    if torch.cuda.is_available():
        pytest.skip("what a machine without a GPU reports")
    _, acc = qwen3
    assert acc.info["graph"] == "skipped: no CUDA device"
    assert acc.info["compile"] == "skipped: no CUDA device"


def test_public_names_are_exported_lazily():
    assert af.accelerate is accelerate
    assert af.Accelerator.__name__ == "Accelerator"
    assert {"accelerate", "Accelerator", "profile_model", "benchmark_operation", "device_info"} <= set(
        af.__all__
    )


# ----------------------------------------------------------------------------------------------------------
# Bad input: each error names the value and what is accepted


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size=0 must be an integer >= 1"),
        ({"max_seq_len": 1}, "max_seq_len=1 must be >= 2"),
        ({"max_seq_len": 4096}, "max_seq_len=4096 exceeds the model's max_position_embeddings=128"),
        ({"dtype": torch.float64}, "dtype=torch.float64 is not supported; accepted: torch.float16"),
        ({"attention": "flash"}, "attention='flash' is not one of ('auto', 'kernels', 'torch')"),
        ({"projections": "cublas"}, "projections='cublas' is not one of ('auto', 'kernels', 'torch')"),
        ({"attention": "torch", "projections": "kernels"}, "projections='kernels' needs Triton"),
        ({"cuda_graph": "yes"}, "cuda_graph='yes' must be True, False or None"),
        ({"compile": 1}, "compile=1 must be True, False or None (None: on with a CUDA device)"),
        ({"tune": 1}, "tune=1 must be True or False"),
    ],
)
def test_accelerate_rejects_bad_arguments(options, message):
    with pytest.raises(ValueError, match="^" + _escape(message)):
        accelerate(tiny_model(), **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuda_graph": True}, "cuda_graph=True needs the model on a CUDA device; it is on cpu"),
        ({"compile": True}, "compile=True needs the model on a CUDA device; it is on cpu"),
        ({"tune": True}, "tune=True tunes the compiled decode step: it needs compile (a CUDA device)"),
    ],
)
def test_gpu_options_on_a_cpu_model_are_refused(options, message):
    with pytest.raises(ValueError, match="^" + _escape(message)):
        accelerate(tiny_model(), **options)


def test_the_decode_scratch_is_sized_before_the_step_is_compiled_or_captured():
    model = tiny_model()
    acc = accelerate(model, max_batch_size=3, attention="kernels")
    acc.walk.prepare_decode(2)
    shape = (2, model.config.num_attention_heads, 1, model.config.head_dim)
    workspace = acc.walk.attention.workspaces[shape]
    keys = acc.cache.keys[0][:2]
    sizes = (workspace.partials.numel(), workspace.counters.numel())
    for needed in (
        decode.workspace_size(torch.empty(shape, dtype=keys.dtype), keys, torch.ones(2)),
        decode_step.workspace_size(2, shape[1], keys),  # the fused new-token kernel's
    ):
        assert all(have >= need for have, need in zip(sizes, needed, strict=True)), (sizes, needed)


def test_kernels_without_triton_are_refused_with_the_reason(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ValueError, match=r"^attention='kernels' cannot run here: tensors on cpu: Triton kernels"
    ):
        accelerate(tiny_model(), attention="kernels")
    assert accelerate(tiny_model()).info["attention"].startswith("torch sdpa")  # auto falls back


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("gpt2", {"n_embd": 64, "n_layer": 1, "n_head": 2}, "model_type='gpt2' is not supported by the "
         "accelerator; supported: llama, mistral, qwen2, qwen3, gemma, phi3"),
        ("llama", {"head_dim": 32}, "head_dim=32 is not supported by attnforge's kernels"),
        ("mistral", {"sliding_window": 16}, "layer 0 uses sliding-window attention (window 16 < "
         "max_seq_len=128), which the accelerator does not implement; use max_seq_len <= 16"),
        ("llama", {"rope_parameters": DYNAMIC_ROPE, "max_position_embeddings": 256},
         "rope_type='dynamic' changes its frequencies past 64 tokens; the accelerator needs "
         "max_seq_len <= 64 (got 200)"),
    ],
)  # fmt: skip
def test_unsupported_models_are_refused_with_the_reason(model_type, overrides, message):
    config = AutoConfig.for_model(model_type, **{**({} if model_type == "gpt2" else TINY), **overrides})
    if model_type == "gpt2":
        config.vocab_size = VOCAB
    model = AutoModelForCausalLM.from_config(config)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="^" + _escape(message)):
        accelerate(model, max_seq_len=200 if "rope_parameters" in overrides else None)
    assert before == {name: p.data_ptr() for name, p in model.named_parameters()}, "refused: left untouched"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m.config, "final_logit_softcapping", 30.0),
         "final_logit_softcapping is not supported by the accelerator"),
        (lambda m: m.to(torch.float64), "dtype torch.float64 is not supported; accepted: torch.float16"),
        (lambda m: delattr(m.model.layers[1].mlp, "act_fn"),
         "layer 1: LlamaMLP has no act_fn / activation_fn"),
        (lambda m: delattr(m.model.layers[0].self_attn, "v_proj"),
         "layer 0: projections ['q_proj', 'k_proj', 'gate_proj', 'up_proj'] are not a layout the accelerator "
         "knows"),
        (lambda m: setattr(m.model.layers[0].self_attn.k_proj, "bias", torch.nn.Parameter(torch.zeros(128))),
         "layer 0: q_proj, k_proj, v_proj must all have a bias or none (they are fused into one matmul)"),
    ],
)  # fmt: skip
def test_model_features_the_walk_does_not_do_are_refused(change, message):
    model = tiny_model("llama")
    change(model)
    with pytest.raises(UnsupportedModelError, match="^" + _escape(message)):
        accelerate(model)


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_tokens(qwen3):
    _, acc = qwen3
    tokens = prompt(9, seed=15)
    greedy = acc.generate(tokens, max_new_tokens=5, ignore_eos=True).tokens
    options = dict(max_new_tokens=5, ignore_eos=True, temperature=1.5, seed=0)
    assert acc.generate(tokens, top_k=1, **options).tokens == greedy
    assert acc.generate(tokens, top_p=1e-6, **options).tokens == greedy
    assert acc.generate(tokens, **options).tokens != greedy  # without them, sampling at 1.5 wanders


def test_a_base_model_without_lm_head_is_refused():
    base = tiny_model("llama").model
    with pytest.raises(UnsupportedModelError, match=r"is not a causal LM with \.model\.layers and \.lm_head"):
        accelerate(base)


def test_a_cache_too_large_for_memory_says_its_size_and_what_fits(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(cache_module, "free_memory", lambda device: 3 * 2**20)  # 3 MiB free
    with pytest.raises(CacheTooLargeError) as caught:
        accelerate(model, max_seq_len=128, max_batch_size=64)
    text = str(caught.value)
    assert text.startswith(
        "the KV cache needs 0.02 GiB = 2 layers x 2 (K and V) x batch 64 x 2 kv heads x max_seq_len 128 x "
        "head_dim 64 x 4 bytes (float32), but 0.00 GiB is free on "
    )
    assert "reduce max_seq_len (no max_seq_len fits at this batch size) or max_batch_size=64" in text


def test_out_of_memory_while_allocating_is_reported_with_the_size(monkeypatch):
    model = tiny_model()

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cache_module, "free_memory", lambda device: 64 * 2**20)
    monkeypatch.setattr(torch, "zeros", fail)
    with pytest.raises(
        CacheTooLargeError, match=r"^the KV cache needs .* x max_seq_len 100 x .*is free on "
    ) as e:
        accelerate(model, max_seq_len=100)
    assert "reduce max_seq_len (max_seq_len=32768 would fit) or max_batch_size=1" in str(e.value)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize(
    ("prompts", "options", "message"),
    [
        ([[5]] * 5, {}, "5 prompts exceed max_batch_size=4"),
        ([5] * 120, {"max_new_tokens": 9},
         "the longest prompt (120 tokens) + max_new_tokens=9 exceeds max_seq_len=128"),
        ("hello", {}, "text prompts need a tokenizer"),
        ([5, 6], {"stop": "x"}, "stop='x' needs a tokenizer"),
        ([], {}, "prompts=[]: expected a string, token ids, chat messages, or a list of them"),
        ([[5], []], {}, "prompt []: expected a string, token ids or chat messages"),
        ([5, VOCAB], {}, f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
        (torch.ones(2, 3), {}, "a tensor prompt must be integer token ids [L] or [B, L]"),
        ([5], {"max_new_tokens": 0}, "max_new_tokens=0 must be an integer >= 1"),
        ([5], {"temperature": -1.0}, "temperature=-1.0 must be a number >= 0 (0 = greedy)"),
        ([5], {"temperature": float("nan")}, "temperature=nan must be a number >= 0"),
        ([5], {"temperature": 1.0, "top_k": -2}, "top_k=-2 must be an integer >= 0 (0 = keep all tokens)"),
        ([5], {"temperature": 1.0, "top_p": 0.0}, "top_p=0.0 must be in (0, 1] (1 = keep all tokens)"),
        ([5], {"temperature": 1.0, "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ([5], {"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be a number > 0 (1 = off)"),
        ([5], {"seed": "7"}, "seed='7' must be an integer or None"),
        ([5], {"top_k": 40}, "top_k=40 has no effect with temperature=0 (greedy); set temperature > 0"),
        ([5], {"eos_token_id": "2", "max_new_tokens": 4},
         "eos_token_id='2' must be an int or a list of ints"),
    ],
)  # fmt: skip
def test_generate_rejects_bad_input(qwen3, prompts, options, message):
    _, acc = qwen3
    with pytest.raises(ValueError, match="^" + _escape(message)):
        acc.generate(prompts, **options)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ----------------------------------------------------------------------------------------------------------
# GPU: the captured graph replays what the eager step computes


@CUDA
def test_graph_replay_gives_the_eager_tokens_and_allocates_nothing_per_token():
    model = tiny_model("qwen3").to(torch.bfloat16)
    tokens = [prompt(37, seed=1), prompt(90, seed=2)]
    for compiled in (False, True):  # compiled code rounds bf16 differently: compare it with itself, eager
        eager = accelerate(model, max_batch_size=2, cuda_graph=False, compile=compiled)
        expected = eager.generate(tokens, max_new_tokens=24, ignore_eos=True).tokens
        graphed = accelerate(model, max_batch_size=2, compile=compiled)
        assert graphed.generate(tokens, max_new_tokens=24, ignore_eos=True).tokens == expected
        assert graphed.info["graph"] == "captured (replayed per token)", graphed.info
        assert graphed.info["compile"].startswith("on: inductor" if compiled else "off"), graphed.info
        before = torch.cuda.memory_allocated()
        graphed.generate(tokens, max_new_tokens=24, ignore_eos=True)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before


def test_several_rows_take_the_kernel_for_weights_as_stored_only(monkeypatch):
    """Where the swapped product runs (faked: fast_rows 8), 8 rows of a plain weight go through the kernel,
    9 do not, and packed codes keep one row (several rows of them would take its plain loop)."""
    from types import SimpleNamespace

    from attnforge.accel.projections import KernelProjections
    from attnforge.kernels import gemv

    monkeypatch.setattr(gemv, "fast_rows", lambda device, dtype: 8)
    projections = SimpleNamespace(_gemv=gemv)
    weight = torch.zeros(4, 16)
    packed = gemv.PackedWeight(
        torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 4, 16
    )
    small = lambda rows, product: KernelProjections._small(projections, torch.zeros(rows, 1, 16), product)  # noqa: E731
    assert small(8, (weight, None)) and not small(9, (weight, None))
    assert small(1, (packed, None)) and not small(2, (packed, None))


@CUDA
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_on_a_gpu_the_kernel_projections_give_torchs_logits(batch):
    """One decode call of `batch` rows (on a Hopper GPU up to 8 through the swapped product)."""
    model = tiny_model("qwen3").to(torch.bfloat16)
    prompts = [prompt(30, seed=4 + b) for b in range(batch)]
    logits = {}
    for projections in ("kernels", "torch"):
        options = dict(projections=projections, max_batch_size=batch, cuda_graph=False, compile=False)
        acc = accelerate(model, **options)
        acc.generate(prompts, max_new_tokens=1, ignore_eos=True)  # prefill (torch products), cache filled
        ids = torch.tensor([[tokens[-1]] for tokens in prompts], device=DEVICE)
        positions = torch.full((batch, 1), 30, device=DEVICE)
        with torch.no_grad():  # through fused_linear where projections="kernels"
            logits[projections] = acc.walk.logits(ids, positions, positions[:, 0] + 1, None, 31)
    error = (logits["kernels"] - logits["torch"]).norm() / logits["torch"].norm()
    assert error < 2e-2, error


@CUDA
def test_a_seeded_sampled_run_reproduces_in_the_graph():
    model = tiny_model("llama").to(torch.bfloat16)
    acc = accelerate(model)
    options = dict(max_new_tokens=20, ignore_eos=True, temperature=1.0, top_p=0.9, top_k=50)
    first = acc.generate(prompt(16), seed=3, **options).tokens
    state = torch.cuda.get_rng_state()
    assert acc.generate(prompt(16), seed=3, **options).tokens == first
    assert torch.equal(torch.cuda.get_rng_state(), state), "the caller's generator state is left as it was"
    assert acc.generate(prompt(16), seed=4, **options).tokens != first
