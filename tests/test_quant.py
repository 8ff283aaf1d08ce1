"""Weight quantization (attnforge.accel.quant): the packed format, recipes, errors, checkpoints, the
accelerator on quantized models, and the command line. Tiny random-weight models, fp32 on CPU."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import attnforge as af
from attnforge import cli
from attnforge.accel.quant import QuantizedLinear, fuse_quantized, register_backend, save_quantized
from attnforge.accel.quant.linear import (
    MATMUL_BACKENDS,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from attnforge.accel.quant.quality import logit_error, perplexity, quality_run, quality_text

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
            bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=0)  # fmt: skip
# the triton backend's tests run where its kernel does: on the GPU when there is one, else the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error of a Gaussian weight, per bits (measured ~0.087 / 0.044 / 0.0053 at group 64)
MAX_WEIGHT_ERROR = {4: 0.1, 5: 0.05, 8: 0.007}


def tiny_model(model_type: str = "llama", **overrides):
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# The format


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("cols", [8, 64, 200])
def test_packing_round_trips_every_code(bits, cols):
    q = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    q[0] = 2**bits - 1  # the extreme codes too
    q[1] = 0
    codes = pack_codes(q, bits)
    assert codes.shape == (5, cols * bits // 8) and codes.dtype == torch.uint8
    assert torch.equal(unpack_codes(codes, bits, cols), q)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantized_weight_is_close_and_more_bits_are_closer(bits, group_size):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = quantize_weight(weight, bits, group_size)
    assert scales.shape == zeros.shape == (48, 256 // group_size)
    back = dequantize_weight(codes, scales, zeros, bits, group_size, 256)
    assert float((back - weight).norm() / weight.norm()) < MAX_WEIGHT_ERROR[bits] * (
        1.2 if group_size == 128 else 1
    )


def test_constant_and_zero_groups_are_exact():
    weight = torch.zeros(4, 64)
    weight[1] = 0.37
    weight[2] = -1.5
    for bits in (4, 5, 8):
        back = dequantize_weight(*quantize_weight(weight, bits, 32), bits, 32, 64)
        assert torch.allclose(back, weight, rtol=1e-6, atol=0), bits


def test_quantized_linear_keeps_the_bias_and_shapes():
    linear = torch.nn.Linear(64, 24, bias=True)
    layer = QuantizedLinear.from_linear(linear, 8, 32)
    x = torch.randn(2, 3, 64)
    assert layer(x).shape == (2, 3, 24)
    assert torch.equal(layer.bias, linear.bias)
    with torch.no_grad():
        assert float((layer(x) - linear(x)).norm() / linear(x).norm()) < 0.01
    assert layer.nbytes() == 24 * 64 + 24 * 2 * 4 + 24 * 2 + 24 * 4


def test_quantized_linear_compiles_without_graph_breaks():
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 40), 5, 32)
    x = torch.randn(3, 64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # dynamo traces it whole: no breaks
    assert torch.equal(compiled(x), layer(x))


def test_fused_quantized_layers_share_storage_and_give_concatenated_outputs():
    layers = [QuantizedLinear.from_linear(torch.nn.Linear(64, n), 4, 32) for n in (16, 8, 8)]
    x = torch.randn(2, 64)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    fused = fuse_quantized(layers)
    assert torch.equal(fused(x), expected)
    assert layers[1].codes.data_ptr() == fused.codes.data_ptr() + 16 * fused.codes.shape[1]
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), expected)  # each still works
    assert fuse_quantized(layers).codes.data_ptr() == fused.codes.data_ptr()  # a second fusion copies nothing
    other = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), 8, 32)
    assert fuse_quantized([layers[0], other]) is None  # different bits: not one matmul


def test_a_registered_backend_is_called():
    calls = []

    def counting(layer, x):
        calls.append(x.shape)
        return MATMUL_BACKENDS["torch"](layer, x)

    register_backend("counting", counting)
    try:
        model = tiny_model()
        af.quantize(model, "speed-4bit", 32, backend="counting")
        model(ids())
        assert len(calls) == 2 * 7 + 1  # seven linears per layer and the LM head
    finally:
        MATMUL_BACKENDS.pop("counting")


# ----------------------------------------------------------------------------------------------------------
# Recipes, predicates, report


@pytest.mark.parametrize(("recipe", "bits"), [("speed-4bit", 4), ("balanced-5bit", 5), ("quality-8bit", 8)])
def test_uniform_recipes_quantize_every_linear(recipe, bits):
    model = tiny_model()
    reference = model(ids()).logits
    report = af.quantize(model, recipe, 64)
    assert set(report.bits.values()) == {bits} and len(report.bits) == 15
    assert isinstance(model.lm_head, QuantizedLinear)
    assert report.model_bytes_after < report.model_bytes_before
    layer = report.layers[0]
    assert layer.shape == (256, 64)  # q_proj: 4 heads x 64
    assert layer.bytes_before == 256 * 64 * 4 and layer.bytes_after == 256 * (64 * bits // 8 + 4 + 1)
    with torch.no_grad():
        error = float((model(ids()).logits - reference).norm() / reference.norm())
    assert error < {4: 0.5, 5: 0.25, 8: 0.04}[bits], error  # measured 0.38, 0.16, 0.022


def test_mixed_keeps_the_lm_head_and_raises_v_and_down_to_8_bits():
    model = tiny_model()
    report = af.quantize(model, "mixed", 32)
    assert report.bits["lm_head"] is None and isinstance(model.lm_head, torch.nn.Linear)
    assert report.bits["model.layers.0.self_attn.v_proj"] == 8
    assert report.bits["model.layers.1.mlp.down_proj"] == 8
    assert report.bits["model.layers.0.self_attn.q_proj"] == 4
    assert "unquantized" in report.summary()


def test_a_predicate_chooses_per_layer():
    def rule(name, module):
        if name.endswith("o_proj"):
            return False
        return 8 if ".0." in name else True

    model = tiny_model()
    report = af.quantize(model, "balanced-5bit", 32, predicate=rule)
    assert report.bits["model.layers.0.self_attn.o_proj"] is None
    assert report.bits["model.layers.0.mlp.up_proj"] == 8
    assert report.bits["model.layers.1.mlp.up_proj"] == 5
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "fast-3bit"}, "recipe='fast-3bit' is not a quantization recipe; accepted: speed-4bit, "
                                  "balanced-5bit, quality-8bit, mixed"),
        ({"group_size": 48}, "group_size=48 is not supported; accepted: (32, 64, 128)"),
        ({"predicate": lambda name, module: 3},
         "predicate returned 3 for layer 'model.layers.0.self_attn.q_proj'; "
         "accepted: True, False or bits (4, 5, 8)"),
        ({"backend": "cuda-magic"},
         "backend='cuda-magic' is not a registered matmul backend (auto, torch, triton, tinygemm)"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_value_and_the_accepted_ones(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError) as error:
        af.quantize(model, **{"recipe": "speed-4bit", **kwargs})
    assert message in str(error.value)
    assert isinstance(model.lm_head, torch.nn.Linear)  # nothing was changed


def test_in_features_not_divisible_by_the_group_size_is_refused_with_the_layer():
    model = tiny_model(intermediate_size=96)  # down_proj has 96 inputs: 32 divides it, 64 does not
    with pytest.raises(ValueError) as error:
        af.quantize(model, "speed-4bit", 64)
    assert "layer 'model.layers.0.mlp.down_proj': in_features=96 is not divisible by group_size=64" in str(
        error.value
    )
    assert "accepted group sizes here: (32,)" in str(error.value)
    assert isinstance(model.model.layers[0].mlp.gate_proj, torch.nn.Linear)  # checked before any change


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("recipe", ["balanced-5bit", "mixed"])
def test_saved_checkpoint_loads_back_with_identical_logits(tmp_path, recipe):
    model = tiny_model(tie_word_embeddings=recipe == "mixed")  # mixed keeps the tied head: stored once
    af.quantize(model, recipe, 32)
    with torch.no_grad():
        expected = model(ids()).logits
    save_quantized(model, tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert section["recipe"] == recipe and section["group_size"] == 32 and section["device"] == "cpu"
    assert section["bits"]["model.layers.0.self_attn.q_proj"] in (4, 5)
    assert {"attnforge_version", "torch_version", "dtype"} <= set(section)
    if recipe == "mixed":
        assert section["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = af.load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_model(), tmp_path)


# ----------------------------------------------------------------------------------------------------------
# The accelerator on quantized models


def greedy(model, tokens: torch.Tensor, new: int) -> list[int]:
    """The quantized model's own greedy tokens: a full forward per step (no cache)."""
    out = []
    with torch.no_grad():
        for _ in range(new):
            token = int(model(tokens).logits[0, -1].argmax())
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]], device=tokens.device)], dim=1)
    return out


ACCELERATED = [
    ("llama", "speed-4bit"),
    ("llama", "mixed"),
    ("qwen2", "balanced-5bit"),
    ("phi3", "quality-8bit"),
]


@pytest.mark.parametrize(("model_type", "recipe"), ACCELERATED)
def test_accelerator_gives_the_quantized_models_greedy_tokens(model_type, recipe):
    model = tiny_model(model_type)
    af.quantize(model, recipe, 32)
    prompt = ids(11)
    expected = greedy(model, prompt, 5)
    acc = af.accelerate(model, max_seq_len=64, attention="torch")
    assert acc.generate(prompt[0].tolist(), max_new_tokens=5, ignore_eos=True).tokens == [expected]
    layer = acc.plan.layers[0]
    assert layer.qkv_weight is None and layer.qkv_quantized is not None
    if recipe != "mixed":  # one fused matmul whose codes are the projections' own
        q_proj = model.model.layers[0].self_attn
        q_proj = getattr(q_proj, "q_proj", None) or q_proj.qkv_proj
        assert layer.qkv_quantized.codes.data_ptr() == q_proj.codes.data_ptr()
    assert acc.weight_bytes < sum(p.numel() * 4 for p in tiny_model(model_type).parameters())


@pytest.mark.parametrize("recipe", ["speed-4bit", "balanced-5bit", "quality-8bit"])
def test_the_triton_backend_runs_decode_rows_in_the_kernel_and_gives_torchs_results(recipe, monkeypatch):
    """backend="triton": calls of at most gemv.MAX_ROWS rows read the packed codes in `fused_linear` (the
    torch backend's logits to fp32 rounding, its greedy tokens through the accelerator); longer calls
    dequantize as the torch backend does."""
    from attnforge.kernels import gemv

    kernel, reference = tiny_model().to(DEVICE), tiny_model().to(DEVICE)
    af.quantize(kernel, recipe, 32, backend="triton")
    af.quantize(reference, recipe, 32, backend="torch")  # "auto" runs the kernel too on a GPU
    launches = []
    launch = gemv.launch_linear
    monkeypatch.setattr(gemv, "launch_linear", lambda *args, **kw: launches.append(1) or launch(*args, **kw))
    with torch.no_grad():
        for length, kernel_calls in ((5, 2 * 7 + 1), (gemv.MAX_ROWS + 3, 0)):
            launches.clear()
            tokens = ids(length).to(DEVICE)
            got, want = kernel(tokens).logits, reference(tokens).logits
            assert len(launches) == kernel_calls
            assert ((got - want).norm() / want.norm()).item() < 1e-5
    prompt = ids(11).to(DEVICE)
    expected = [greedy(reference, prompt, 4)]
    for attention in ("torch", "kernels"):  # with the kernels, the step's products fuse their norms too
        acc = af.accelerate(kernel, max_seq_len=64, attention=attention)
        fused = getattr(acc.walk.projections, "layers", [None])[0]
        assert (fused is not None) == (attention == "kernels")
        assert acc.generate(prompt[0].tolist(), max_new_tokens=4, ignore_eos=True).tokens == expected


def test_the_triton_backend_traces_whole_and_says_where_it_cannot_run(monkeypatch):
    from attnforge import environment

    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), 4, 32, backend="triton").to(DEVICE)
    x = torch.randn(1, 64, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True)  # no graph break on the decode path
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    # off a GPU the backend asks whether Triton can run there (CPU tensors, on any machine)
    monkeypatch.setattr(environment, "triton_status", lambda device: (False, "no CUDA GPU (test)"))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: no CUDA GPU \\(test\\)"):
        layer.cpu()(x.cpu())


# ----------------------------------------------------------------------------------------------------------
# The tinygemm backend: core torch's int4 kernel (its CPU twin here, the CUDA kernel on a GPU)

TINYGEMM_DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", TINYGEMM_DTYPES)
def test_the_tinygemm_backend_gives_the_torch_backends_results(group, dtype):
    """Its (q - 8) * scale + offset dequantization is the format's (q - zero) * scale up to the offset's
    rounding to the scales' dtype: fp32 to its rounding, bf16 within bf16's."""
    linear = torch.nn.Linear(256, 48).to(DEVICE, dtype)
    tiny = QuantizedLinear.from_linear(linear, 4, group, backend="tinygemm")
    reference = QuantizedLinear.from_linear(linear, 4, group, backend="torch")
    x = torch.randn(3, 5, 256, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        got, want = tiny(x), reference(x)
    assert got.shape == (3, 5, 48) and got.dtype == dtype
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < (
        1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize(("bits", "out_features"), [(8, 48), (5, 48), (4, 40)])
def test_what_tinygemm_does_not_serve_goes_to_the_triton_backend(bits, out_features, monkeypatch):
    """5 and 8 bits, and output counts its tiles do not divide (16 on the CPU, 8 on CUDA: 40 served there)."""
    from attnforge.accel.quant import linear as quant_linear

    calls = []
    triton = quant_linear._triton_matmul
    monkeypatch.setattr(quant_linear, "_triton_matmul", lambda *a: calls.append(1) or triton(*a))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    layer = torch.nn.Linear(64, out_features).to(DEVICE, dtype)
    tiny = QuantizedLinear.from_linear(layer, bits, 32, backend="tinygemm")
    x = torch.randn(2, 64, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        got, want = tiny(x), QuantizedLinear.from_linear(layer, bits, 32, backend="torch")(x)
    assert len(calls) == (0 if DEVICE == "cuda" and (bits, out_features) == (4, 40) else 1)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_tinygemms_weight_is_converted_once_and_again_when_the_codes_change():
    dtype = TINYGEMM_DTYPES[0]
    first, second = (torch.nn.Linear(64, 32).to(DEVICE, dtype) for _ in range(2))
    layer = QuantizedLinear.from_linear(first, 4, 32, backend="tinygemm")
    device = torch.device(DEVICE)
    assert layer.tinygemm_weight(device) is layer.tinygemm_weight(device)
    kept = layer.tinygemm_weight(device)
    other = QuantizedLinear.from_linear(second, 4, 32, backend="torch")
    with torch.no_grad():
        for name in ("codes", "scales", "zeros", "bias"):
            getattr(layer, name).copy_(getattr(other, name))
    assert layer.tinygemm_weight(device) is not kept
    x = torch.randn(2, 64, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        assert ((layer(x) - other(x)).float().norm() / other(x).float().norm()).item() < 1e-2


def test_tinygemm_under_torch_compile_needs_its_weight_converted_first():
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, backend="tinygemm").to(DEVICE)
    layer = layer.to(TINYGEMM_DTYPES[0])
    x = torch.randn(1, 64, device=DEVICE, dtype=TINYGEMM_DTYPES[0])
    with torch.no_grad(), pytest.raises(Exception, match="run the model once before torch.compile"):
        torch.compile(layer, fullgraph=True)(x)
    layer.prepare(torch.device(DEVICE))  # what the accelerator's plan does for every quantized layer
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize(
    ("backend", "bits", "dtype", "device", "tinygemm", "packed"),
    [
        ("auto", 4, torch.bfloat16, "cuda", True, False),  # core torch's int4 kernel
        ("auto", 8, torch.bfloat16, "cuda", False, True),  # attnforge's packed GEMV for the other bits
        ("auto", 4, torch.float16, "cuda", False, True),  # the int4 kernel takes bf16 only on CUDA
        ("auto", 4, torch.float32, "cpu", False, False),  # off a GPU: the torch reference
        ("tinygemm", 4, torch.float32, "cpu", True, False),  # its CPU twin
        ("tinygemm", 8, torch.float32, "cpu", False, True),
        ("triton", 4, torch.bfloat16, "cuda", False, True),
        ("torch", 4, torch.bfloat16, "cuda", False, False),
    ],
)
def test_which_kernel_a_layer_runs_follows_its_backend_bits_dtype_and_device(
    backend, bits, dtype, device, tinygemm, packed
):
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32).to(dtype), bits, 32, backend=backend)
    assert layer.runs_tinygemm(torch.device(device)) is tinygemm
    assert layer.runs_packed_gemv(torch.device(device)) is packed


def test_auto_is_the_default_backend_and_the_torch_reference_off_a_gpu():
    model = tiny_model()
    assert af.quantize(model, "speed-4bit", 32).backend == "auto"
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), MATMUL_BACKENDS["torch"](layer, x))


def test_a_quantized_model_compiles_without_an_eager_call_first():
    """quantize converts each layer's weight for its backend at once (tinygemm's format here). On an H100
    this fails its 1% bound: compiled vs eager 1.24%, and 1.27% for the same model unquantized
    (h100/gpu-tests-gemv-quant-accel-20261206-3355df7.log), so the gap is bf16 rounding in inductor's fused
    kernels, not the conversion; the bound is kept, the message reports both gaps."""
    model = tiny_model().to(DEVICE, TINYGEMM_DTYPES[0])
    plain = copy.deepcopy(model)
    af.quantize(model, "speed-4bit", 32, backend="tinygemm")
    assert getattr(model.model.layers[0].mlp.down_proj, "_tinygemm", None) is not None
    prompt = ids(7).to(DEVICE)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=False)(prompt).logits  # before any eager call
        eager = model(prompt).logits
        plain_gap = _rel_gap(torch.compile(plain, fullgraph=False)(prompt).logits, plain(prompt).logits)
    gap = _rel_gap(compiled, eager)
    assert gap < 1e-2, f"compiled vs eager {gap:.2e} (unquantized model: {plain_gap:.2e})"


def _rel_gap(a, b):
    return ((a - b).float().norm() / b.float().norm()).item()


def test_the_accelerator_runs_the_tinygemm_backend_and_gives_its_eager_tokens():
    """bf16 on CUDA (the kernel serves no other activations there; fp32 would go to the triton backend)."""
    model = tiny_model().to(DEVICE, TINYGEMM_DTYPES[0])
    af.quantize(model, "speed-4bit", 32, backend="tinygemm")
    prompt = ids(11).to(DEVICE)
    acc = af.accelerate(model, max_seq_len=64, attention="torch")
    assert getattr(acc.plan.layers[0].qkv_quantized, "_tinygemm", None) is not None  # converted by the plan
    assert acc.generate(prompt[0].tolist(), max_new_tokens=4, ignore_eos=True).tokens == [
        greedy(model, prompt, 4)
    ]


# ----------------------------------------------------------------------------------------------------------
# Quality measurement and the command line


def test_quality_measures_agree_with_their_definitions():
    logits = torch.randn(6, VOCAB)
    tokens = torch.randint(0, VOCAB, (1, 6))
    assert logit_error(logits, logits) == {"rel_l2": 0.0, "top1_agreement": 1.0, "kl": 0.0}
    shifted = logit_error(logits, logits + 3.0)  # softmax ignores a shift; L2 does not
    assert shifted["kl"] == pytest.approx(0.0, abs=1e-5) and shifted["rel_l2"] > 0.5
    uniform = torch.zeros(6, VOCAB)
    assert perplexity(uniform, tokens) == pytest.approx(VOCAB)
    assert 2000 < len(quality_text()) < 5000


def test_quality_run_leaves_the_model_alone_and_rows_follow_bits():
    model = tiny_model()
    rows = quality_run(model, ids(30), recipes=["speed-4bit", "quality-8bit"], group_sizes=[32])
    assert [r["recipe"] for r in rows] == ["unquantized", "speed-4bit", "quality-8bit"]
    assert rows[2]["rel_l2"] < rows[1]["rel_l2"]
    assert rows[2]["weight_bytes"] > rows[1]["weight_bytes"]
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_convert_command_writes_a_checkpoint_that_loads(tmp_path):
    source = tmp_path / "source"
    model = tiny_model()
    model.save_pretrained(source)
    destination = tmp_path / "quantized"
    args = ["convert", str(source), str(destination), "--recipe", "quality-8bit", "--group-size", "32",
            "--predicate", "tests.test_quant:keep_lm_head", "--dtype", "bfloat16"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "weights from the checkpoint" in result.output and "14 8-bit, 1 unquantized" in result.output
    loaded = af.load_quantized(destination)
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantizedLinear)
    assert loaded.lm_head.weight.dtype == torch.bfloat16  # --dtype: the unquantized parts and the scales
    assert loaded.model.layers[1].mlp.up_proj.scales.dtype == torch.bfloat16


def test_convert_command_refuses_a_bad_recipe_in_one_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["convert", "smollm2", str(tmp_path), "--recipe", "tiny"])
    assert result.exit_code == 2
    assert "recipe='tiny' is not a quantization recipe; accepted:" in result.output
    result = CliRunner().invoke(cli.app, ["convert", "smollm2", str(tmp_path), "--dtype", "int8"])
    assert result.exit_code == 2
    assert "--dtype 'int8' is not supported; accepted: float32, bfloat16, float16" in result.output


def keep_lm_head(name, module):
    """A --predicate for the CLI test."""
    return name != "lm_head"


def test_bench_quant_commands_write_their_results_where_asked(tmp_path):
    """Quality (random weights, one layer) and decode speed (a CPU smoke test) per recipe, saved."""
    small = [
        "--model",
        "qwen3-0.6b",
        "--layers",
        "1",
        "--vocab",
        "512",
        "--recipes",
        "quality-8bit,speed-4bit",
    ]
    quality_args = ["bench", "quant", *small, "--group-sizes", "32", "--tokens", "16", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli.app, [*quality_args, "--stem", "q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["unquantized", "quality-8bit", "speed-4bit"]
    speed_args = ["bench", "quant-speed", *small, "--prompt-tokens", "8", "--new-tokens", "3", "--runs", "1",
                  "--group-size", "32"]  # fmt: skip
    result = CliRunner().invoke(cli.app, [*speed_args, "--out", str(tmp_path), "--stem", "s"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    unquantized = "bfloat16" if torch.cuda.is_available() else "float32"  # the dtype speed is measured in
    assert [r["recipe"] for r in doc["rows"]] == [unquantized, "quality-8bit", "speed-4bit"]
    assert doc["rows"][0]["ratio"] == 1.0 and all(r["decode_tok_s"] > 0 for r in doc["rows"])
    assert [r["group_size"] for r in doc["rows"]] == [None, 32, 32] and doc["settings"]["new_tokens"] == 3
    assert (tmp_path / "s.md").read_text().startswith("# Decode per")
    assert ("smoke test" in (doc["note"] or "")) == (not torch.cuda.is_available())


def test_bench_quant_speed_refuses_an_unknown_backend_in_one_line():
    result = CliRunner().invoke(cli.app, ["bench", "quant-speed", "--backend", "gemlite"])
    assert result.exit_code == 2
    assert "--backend 'gemlite' is not registered; accepted: auto, torch, triton, tinygemm" in result.output
