"""Evolved kernels in a model: `load_and_patch_model(..., evolved_program=)` runs a program only after it
passed the evaluator's correctness stages at the model's shapes; `attnforge evolve evaluate` and `evolve tune`
on the command line. A small random-weight Qwen3 (4 query / 2 key-value heads, head_dim 64) keeps the
interpreter quick."""

import json

import pytest
import torch
from typer.testing import CliRunner

import attnforge as af
from attnforge import demo
from attnforge.cli import app
from attnforge.evolve.adopt import EvolvedProgramRejected
from attnforge.evolve.programs import initial_program
from attnforge.models import build_model
from attnforge.optimizer import get_optimizer

SMALL = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "hidden_size": 128, "intermediate_size": 256, "vocab_size": 512}  # fmt: skip
WRONG = "import torch\n\ndef attention(q, k, v, **kw):\n    return torch.zeros_like(q)\n"


@pytest.fixture
def small_model():
    model = build_model("qwen3-0.6b", dtype=torch.float32, device="cpu", attn_implementation="eager", **SMALL)
    yield model
    af.unpatch_model(model)
    get_optimizer().use_kernel("decode", None)


@pytest.fixture
def programs(tmp_path):
    (tmp_path / "good.py").write_text(initial_program("decode"))
    (tmp_path / "wrong.py").write_text(WRONG)
    return tmp_path


def test_a_program_that_fails_a_case_is_refused_and_never_used(small_model, programs):
    with pytest.raises(EvolvedProgramRejected) as error:
        af.load_and_patch_model(small_model, evolved_program=programs / "wrong.py")
    message = str(error.value)
    assert (
        "failed the evaluator's correctness stages on this machine (float32, 4:2 heads, head_dim 64)"
        in message
    )
    assert "smoke (random B=2 Hq=4 Hkv=2 Lq=1 Lkv=65 D=64 float32): max relative L2" in message
    assert get_optimizer().replaced_kernels() == {}


def test_a_verified_program_runs_the_models_decode_calls(small_model, programs):
    af.load_and_patch_model(small_model, evolved_program=programs / "good.py")
    assert "evolved program good.py" in get_optimizer().replaced_kernels()["decode"]
    report = demo.correctness_check(small_model, demo.random_prompt(512, 8), 3)
    assert report.passed, report
    ran = [d for d in report.decisions if "evolved program good.py" in d["reason"]]
    assert ran and sum(d["calls"] for d in ran) == report.stats["by_kernel"]["decode"] > 0


def test_load_and_patch_model_refuses_load_options_for_a_loaded_model(small_model):
    with pytest.raises(TypeError, match=r"load options \['dtype'\] need a model name or path"):
        af.load_and_patch_model(small_model, dtype=torch.float32)


def test_use_kernel_refuses_what_it_cannot_run():
    optimizer = get_optimizer()
    with pytest.raises(ValueError, match="kind='encode' is not one of"):
        optimizer.use_kernel("encode", lambda *a, **k: None)
    with pytest.raises(TypeError, match="function must be callable or None, got int"):
        optimizer.use_kernel("decode", 3)


def test_evolve_evaluate_refuses_a_wrong_program_before_any_generation(programs, tmp_path):
    out = tmp_path / "verdict.json"
    result = CliRunner().invoke(app, ["evolve", "evaluate", str(programs / "wrong.py"), "--out", str(out)])
    assert result.exit_code == 1 and "max relative L2" in result.output
    verdict = json.loads(out.read_text())
    assert verdict["metrics"]["combined_score"] == 0.0 and "generation" not in verdict


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "missing.py"], "PROGRAM 'missing.py' is not a file"),
        (["evaluate", "x.py", "--subset", "most"], "--subset 'most' is not one of quick, full"),
        (["evaluate", "x.py", "--kernel", "encode"], "--kernel 'encode' is not one of decode, prefill"),
        (["tune"], "give exactly one of --model NAME or --shapes LIST"),
        (["tune", "--model", "qwen3-0.6b", "--shapes", "1x32x8x1x4096x128"], "give exactly one"),
        (["tune", "--kernel", "encode", "--model", "qwen3-0.6b"], "--kernel 'encode' is not one of"),
        (["tune", "--dtype", "float64", "--model", "qwen3-0.6b"], "--dtype 'float64' is not one of"),
        (["tune", "--shapes", "1x32x8x1x4096"], "is not BxHqxHkvxLqxLkvxD[@valid]"),
        (["tune", "--model", "qwen3-0.6b", "--elite", "8"], "elite=8 in [0, population)"),
        (["tune", "--model", "no-such-model"], "no-such-model"),
    ],
)
def test_evolve_commands_refuse_bad_arguments(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("")
    result = CliRunner().invoke(app, ["evolve", *args], env={"COLUMNS": "300"})
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output


def test_evolve_evaluate_judges_then_generates_with_the_program(small_model, programs, tmp_path):
    small_model.save_pretrained(tmp_path / "small")
    out = tmp_path / "verdict.json"
    args = ["evolve", "evaluate", str(programs / "good.py"), "--model", str(tmp_path / "small"),
            "--new-tokens", "2", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    verdict = json.loads(out.read_text())
    assert verdict["metrics"]["combined_score"] == 1.0 and verdict["generation"]["passed"]
    assert verdict["generation"]["evolved_calls"] > 0 and verdict["generation"]["logits_rel_error"] <= 1e-4
    assert get_optimizer().replaced_kernels() == {}  # given back after the run
