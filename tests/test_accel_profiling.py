"""profile_model, benchmark_operation, device_info: what users of MLX acceleration layers expect, correct."""

import pytest
import torch

import attnforge as af

EXP = (torch.exp, torch.ones(2))


def test_benchmark_operation_counts_matmul_flops():
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    result = af.benchmark_operation(torch.matmul, (a, b), num_iterations=5)
    assert result["flops"] == 2 * 64 * 128 * 32 and result["flops_source"] == "counted"
    assert result["tflops"] == pytest.approx(result["flops"] / (result["time_ms"] * 1e-3) / 1e12)
    assert result["iterations"] == 5 and result["min_ms"] <= result["time_ms"]


def test_benchmark_operation_takes_a_given_flop_count_and_a_single_tensor():
    x = torch.randn(1000)
    result = af.benchmark_operation(torch.exp, x, num_iterations=3, flops=1000)
    assert result["flops"] == 1000 and result["flops_source"] == "given"
    assert result["tflops"] == pytest.approx(1000 / (result["time_ms"] * 1e-3) / 1e12)


def test_benchmark_operation_says_why_it_has_no_rate_for_elementwise_ops():
    result = af.benchmark_operation(torch.exp, (torch.randn(1000),), num_iterations=3)
    assert result["flops"] == 0 and result["tflops"] is None
    assert result["flops_note"].startswith("no FLOPs counted")


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        ((None, ()), {}, TypeError, "fn must be callable, got NoneType"),
        (EXP, {"num_iterations": 0}, ValueError, "num_iterations=0 must be an integer >= 1"),
        (EXP, {"warmup": -1}, ValueError, "warmup=-1 must be an integer >= 0"),
        (EXP, {"flops": -5}, ValueError, r"flops=-5 must be a number >= 0 \(None: count"),
    ],
)  # fmt: skip
def test_benchmark_operation_rejects_bad_input(args, options, error, message):
    with pytest.raises(error, match="^" + message):
        af.benchmark_operation(*args, **options)


class TokenModel(torch.nn.Module):
    """A model whose input embeddings are an nn.Embedding: profile_model must feed it token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)
        self.seen = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        self.seen.append(ids)
        return self.head(self.embed(ids))


def test_profile_model_feeds_token_ids_to_a_token_model():
    model = TokenModel()
    result = af.profile_model(model, input_shape=(2, 16), num_iterations=3)
    ids = model.seen[-1]
    assert ids.dtype == torch.int64 and ids.shape == (2, 16) and int(ids.max()) < 50
    assert result["input"] == "token ids" and result["input_shape"] == [2, 16]
    assert result["tokens_per_s"] == pytest.approx(32 / (result["time_ms"] * 1e-3))
    assert result["parameters"] == 50 * 8 + 8 * 50 + 50
    assert (result["dtype"], result["device"], result["iterations"]) == ("float32", "cpu", 3)


def test_profile_model_feeds_a_float_tensor_otherwise():
    model = torch.nn.Linear(8, 4).to(torch.float64)
    result = af.profile_model(model, input_shape=(3, 8), num_iterations=2)
    assert result["input"] == "float tensor" and result["tokens_per_s"] is None
    assert result["dtype"] == "float64" and result["parameters"] == 36


def test_profile_model_runs_a_transformers_model():
    from attnforge.models import build_model

    model = build_model("qwen3-0.6b", dtype=torch.float32, device="cpu", num_hidden_layers=1,
                        hidden_size=64, intermediate_size=64, vocab_size=300)  # fmt: skip
    result = af.profile_model(model, input_shape=(1, 8), num_iterations=2)
    assert result["input"] == "token ids" and result["tokens_per_s"] > 0


@pytest.mark.parametrize(
    ("model", "shape", "error", "message"),
    [
        ("qwen3", (1, 8), TypeError, "model must be a torch.nn.Module, got str"),
        (TokenModel(), (0, 8), ValueError, r"input_shape=\(0, 8\) must be positive integers"),
        (TokenModel(), (1, 2, 3), ValueError, r"input_shape=\(1, 2, 3\): a token model takes \(batch, seq\)"),
        (TokenModel(), (1, 2), ValueError, r"num_iterations=0 must be an integer >= 1"),
    ],
)
def test_profile_model_rejects_bad_input(model, shape, error, message):
    with pytest.raises(error, match="^" + message):
        af.profile_model(model, input_shape=shape, num_iterations=0 if "num_iterations" in message else 1)


def test_device_info_describes_this_machine():
    info = af.device_info()
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert isinstance(info["triton_kernels"], bool) and info["triton_reason"]
    if torch.cuda.is_available():
        assert info["sm_count"] > 0 and info["free_memory_gib"] > 0
    else:
        assert info["memory_gib"] > 0
