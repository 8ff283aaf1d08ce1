"""`attnforge bench e2e --backend mlx` on MLX's CPU: the agreement check, the timed path, the CLI."""

import functools
import json
import sys

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from typer.testing import CliRunner  # noqa: E402

from attnforge.bench import e2e, mlx_e2e  # noqa: E402
from attnforge.bench.cli import bench_app  # noqa: E402
from attnforge.integrations import mlx_lm as integration  # noqa: E402
from attnforge.integrations.mlx_models import build_model  # noqa: E402

TINY = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024)  # fmt: skip
no_metal = pytest.mark.skipif(mlx_e2e.on_metal(), reason="checks the CPU agreement mode")


@pytest.fixture(autouse=True)
def unpatched():
    integration.unpatch_mlx_lm()
    yield
    integration.unpatch_mlx_lm()
    integration.configure_mlx(composed=False, metal_kernels=False)


@no_metal
def test_without_metal_the_agreement_check_runs_one_short_scenario():
    doc = mlx_e2e.run("qwen3-0.6b", mode="compare", **TINY)
    assert doc["what"] == "e2e-mlx" and doc["note"] == mlx_e2e.NO_METAL_NOTE and len(doc["scenarios"]) == 1
    [scenario] = doc["scenarios"]
    assert scenario["prompt_tokens"] == e2e.CPU_PROMPT_TOKENS and scenario["new_tokens"] == e2e.CPU_NEW_TOKENS
    assert doc["tokens_match"] and len(scenario["sides"]["baseline"]["first_tokens"]) == e2e.CPU_NEW_TOKENS
    stats = doc["optimizer_stats"]
    assert stats["calls"] == stats["fallback_reasons"]["not measured"] > 0 and not stats["optimized"]
    assert doc["baseline_only"] == mlx_e2e.BASELINE_NOTE and "failure" not in doc
    text = mlx_e2e.markdown(doc)
    assert "Greedy tokens of mlx-lm unpatched and patched by attnforge: identical." in text
    assert not integration.is_patched()  # left as found


@no_metal
def test_kernels_all_runs_attnforges_implementation_and_restores_the_settings():
    doc = mlx_e2e.run("llama3-8b", kernels="all", **TINY)
    assert doc["tokens_match"] and "baseline_only" not in doc
    assert doc["optimizer_stats"]["by_kernel"] == {"composed": doc["optimizer_stats"]["calls"]}
    assert integration.get_mlx_settings() == integration.MLXSettings()


def test_a_patch_that_never_ran_is_a_failure(monkeypatch):
    monkeypatch.setattr(integration, "patch_mlx_lm", lambda: 0)
    doc = mlx_e2e.run("qwen3-0.6b", mode="compare", runs=1, warmup=0, **TINY)
    assert doc["failure"].startswith("attnforge's dispatch saw no attention call on the attnforge side")
    assert "**FAILED: attnforge's dispatch saw no attention call" in mlx_e2e.markdown(doc)


def test_timed_runs_interleave_sides_and_summarize():
    # The path a Metal device takes, run here on a tiny model: timings exist, nothing is claimed from them.
    model = build_model("qwen3-0.6b", **TINY)
    result = mlx_e2e.run_scenario(model, e2e.SCENARIOS[0], ["baseline", "attnforge"], runs=2, warmup=1,
                                  vocab_size=TINY["vocab_size"], prompt_tokens=12, new_tokens=3)  # fmt: skip
    for side in ("baseline", "attnforge"):
        summary = result["sides"][side]["summary"]
        assert result["sides"][side]["n"] == 2 and summary["ttft_ms"]["median"] > 0
        assert summary["decode_tok_s"]["median"] > 0 and summary["peak_mem_gib"]["median"] > 0
    calls = result["sides"]["attnforge"]["optimizer_stats"][
        "calls"
    ]  # 3 runs x layers x (prompt + each token)
    assert calls % (3 * TINY["num_hidden_layers"]) == 0 and calls >= 3 * TINY["num_hidden_layers"] * (1 + 3)
    assert result["sides"]["baseline"]["optimizer_stats"]["calls"] == 0
    assert set(result["improvement"]) == {"ttft_ms", "prefill_tok_s", "decode_tok_s", "total_s"}
    doc = {"environment": {}, "created": "now", "model": "m", "mode": "compare", "tokenization": "t",
           "method": "m", "kernel_policy": "measured", "scenarios": [result]}  # fmt: skip
    assert "| context-short | 12 | 3 | baseline |" in mlx_e2e.markdown(doc)


def test_a_local_mlx_model_directory_runs(tmp_path):
    from mlx_lm.utils import save_config, save_model

    config = {"model_type": "llama", "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **TINY}
    save_model(tmp_path, build_model(config))
    save_config(config, tmp_path / "config.json")
    model, loaded = mlx_e2e.load(str(tmp_path), dtype=mx.float32)
    assert loaded["vocab_size"] == TINY["vocab_size"] and model(mx.array([[1, 2]])).shape == (1, 2, 1024)


def test_run_errors_name_the_value_and_the_accepted_ones(tmp_path):
    accepted = r"accepted: \('measured', 'all', 'none'\)"
    with pytest.raises(ValueError, match=r"kernels='fastest' is not known; " + accepted):
        mlx_e2e.run("qwen3-0.6b", kernels="fastest")
    with pytest.raises(
        ValueError, match=r"model='no-such' is neither a bundled architecture nor a local MLX"
    ):
        mlx_e2e.run("no-such")
    with pytest.raises(ValueError, match=r"config overrides \['num_hidden_layers'\] apply to bundled"):
        mlx_e2e.load(str(tmp_path), dtype=mx.float32, num_hidden_layers=1)


def test_cli_without_mlx_prints_the_install_command(monkeypatch):
    for name in list(sys.modules):
        if name == "mlx" or name.startswith(
            ("mlx.", "mlx_lm", "attnforge.bench.mlx", "attnforge.integrations.mlx")
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.delattr(sys.modules["attnforge.bench"], "mlx_e2e")  # `from attnforge.bench import` reads it
    result = CliRunner().invoke(bench_app, ["e2e", "--backend", "mlx"])
    assert result.exit_code == 1 and 'pip install "attnforge[mlx]"' in " ".join(result.output.split())


def test_cli_backend_option(monkeypatch, tmp_path):
    bad = CliRunner().invoke(bench_app, ["e2e", "--backend", "jax"])
    assert bad.exit_code != 0 and "backend='jax' is not one of ('torch', 'mlx')" in bad.output
    monkeypatch.setattr(mlx_e2e, "run", functools.partial(mlx_e2e.run, **TINY))
    result = CliRunner().invoke(bench_app, ["e2e", "--backend", "mlx", "--out", str(tmp_path), "--stem", "x"])
    assert result.exit_code == 0, result.output
    assert "attnforge side:" in result.output and (tmp_path / "x.md").is_file()
    assert json.loads((tmp_path / "x.json").read_text())["backend"] == "mlx"
    monkeypatch.setattr(integration, "patch_mlx_lm", lambda: 0)
    failed = CliRunner().invoke(bench_app, ["e2e", "--backend", "mlx", "--out", str(tmp_path), "--stem", "y"])
    assert failed.exit_code == 1 and "the patch was not in effect" in " ".join(failed.output.split())
