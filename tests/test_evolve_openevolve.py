"""OpenEvolve end to end: the task directory, then a real OpenEvolve run (child process) against a local
OpenAI-compatible server on loopback that answers with scripted SEARCH/REPLACE diffs: one honest improvement
of a launch parameter, one that breaks correctness, one that cheats, one that does not compile. Only the
honest improvement may be kept. Timing is the interpreter's wall clock against attnforge's own kernel (no
GPU here)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from attnforge.cli import app
from attnforge.evolve import openevolve_task
from attnforge.evolve.programs import initial_program
from attnforge.evolve.tasks import Task, default_task, model_task, stage_calls

pytest.importorskip("openevolve")


def _diff(search: str, replace: str, why: str) -> str:
    return f"{why}\n\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


SCRIPT = [
    (
        "improves",
        _diff("    block_n = 64", "    block_n = 128", "Larger key tiles: half the splits and loop trips."),
    ),
    (
        "breaks",
        _diff(
            "        l_sum = l_sum * mine + l_s * theirs",
            "        l_sum = l_sum * mine + l_s",
            "Simplify the merge.",
        ),
    ),  # fmt: skip
    (
        "cheats",
        _diff(
            "    for n0 in range(start, stop, BLOCK_N):",
            "    for n0 in range(start, stop - BLOCK_N, BLOCK_N):",
            "Skip the last tile: it rarely matters.",
        ),
    ),  # fmt: skip
    (
        "does-not-compile",
        _diff(
            "        p = tl.exp2(qk - m_safe[:, None])",
            "        p = tl.exp3(qk - m_safe[:, None])",
            "Use the faster exponential.",
        ),
    ),  # fmt: skip
]


class ScriptedLLM(BaseHTTPRequestHandler):
    """`POST /v1/chat/completions`: the next scripted answer, as an OpenAI chat completion."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        index = len(ScriptedLLM.requests)
        ScriptedLLM.requests.append(body)
        content = SCRIPT[min(index, len(SCRIPT) - 1)][1]
        answer = {"id": f"chat-{index}", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": content}}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}  # fmt: skip
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    ScriptedLLM.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_task_directory_is_what_openevolve_needs(tmp_path):
    task = default_task("decode", cuda=False)
    out = openevolve_task.write_task("decode", tmp_path, task, api_base="http://127.0.0.1:9/v1", model="m",
                                     api_key_env="MY_KEY", iterations=3, islands=1)  # fmt: skip
    program = (out / "initial_program.py").read_text()
    assert program.index("# EVOLVE-BLOCK-START") < program.index("def _split_kernel") < program.index(
        "# EVOLVE-BLOCK-END") < program.index("def attention(")  # fmt: skip
    evaluator = (out / "evaluator.py").read_text()
    assert all(f"def {name}(program_path)" in evaluator
               for name in ("evaluate", "evaluate_stage1", "evaluate_stage2", "evaluate_stage3"))  # fmt: skip
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["llm"]["models"][0]["api_base"] == "http://127.0.0.1:9/v1"
    assert config["llm"]["models"][0]["api_key"] == "${MY_KEY}" and config["max_iterations"] == 3
    assert config["evaluator"]["cascade_evaluation"] and config["evaluator"]["timeout"] > task.timeout_s
    assert Task.from_dict(json.loads((out / "task.json").read_text())) == task


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "encode"], "--task 'encode' is not one of decode, prefill"),
        (["--timing", "fast"], "--timing 'fast' is not one of auto, cuda, interpreter, none"),
        (["--api-key-env", "MY-KEY"], "api_key_env='MY-KEY' is not an environment variable name"),
    ],
)
def test_openevolve_refuses_bad_arguments(tmp_path, args, message):
    result = CliRunner().invoke(app, ["evolve", "openevolve", "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and message in result.output


def test_openevolve_keeps_only_the_honest_improvement(tmp_path, llm_server):
    out = tmp_path / "task"
    args = ["evolve", "openevolve", "--task", "decode", "--out", str(out), "--api-base", llm_server,
            "--model", "scripted", "--iterations", "4", "--islands", "1", "--timing", "interpreter", "--run",
            "--run-timeout", "400"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(ScriptedLLM.requests) == 4 and ScriptedLLM.requests[0]["model"] == "scripted"
    summary = openevolve_task.summarize(out / openevolve_task.OUTPUT)
    assert summary["llm_failures"] == 0 and not summary.get("error")
    best = Path(summary["best_program"]).read_text()
    assert "block_n = 128" in best and "exp3" not in best and "stop - BLOCK_N" not in best
    assert summary["best_score"] > summary["initial_score"] > 0
    by_change = {}
    for program in summary["programs"][1:]:
        code = program["code"]
        change = next(name for name, marker in [("does-not-compile", "exp3"), ("cheats", "stop - BLOCK_N"),
                                                ("breaks", "+ l_s\n"), ("improves", "block_n = 128")]
                      if marker in code)  # fmt: skip
        by_change[change] = program
    assert set(by_change) == {"improves", "breaks", "cheats", "does-not-compile"}, summary["programs"]
    assert by_change["improves"]["score"] == summary["best_score"]
    for name in ("breaks", "cheats"):
        assert by_change[name]["score"] == 0 and "max relative L2" in by_change[name]["reason"]
    assert by_change["does-not-compile"]["score"] == 0 and "exp3" in by_change["does-not-compile"]["reason"]


def test_a_run_that_produced_nothing_fails_loudly(tmp_path, monkeypatch):
    outcome = {"programs": [{"iteration": 0, "score": 1.0, "reason": "correct; not timed", "code": ""}],
               "llm_failures": 4, "initial_score": 1.0, "best_program": None}  # fmt: skip
    monkeypatch.setattr(openevolve_task, "run_task", lambda *a, **k: outcome)
    result = CliRunner().invoke(app, ["evolve", "openevolve", "--out", str(tmp_path), "--run"],
                                env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 1 and "no program beyond the initial one" in result.output
    assert "4 failed LLM calls" in result.output


def test_run_without_openevolve_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openevolve" else real(name, *a)
    )
    result = CliRunner().invoke(app, ["evolve", "openevolve", "--out", str(tmp_path), "--run"])
    assert result.exit_code == 2 and "pip install 'attnforge[evolve]'" in result.output


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda p: openevolve_task.write_task(
                "prefill", p, default_task("decode", cuda=False), api_base="x", model="m"
            ),
            "task kind 'decode' does not match kind='prefill'",
        ),
        (
            lambda p: openevolve_task.write_task(
                "decode", p, default_task("decode", cuda=False), api_base="x", model="m", iterations=0
            ),
            "iterations=0 and islands=2 must be >= 1",
        ),
        (lambda p: initial_program("encode"), "kind='encode' is not one of ('decode', 'prefill')"),
        (lambda p: stage_calls(default_task("decode", cuda=False), 1, 3), "stage=3 has no correctness calls"),
        (lambda p: model_task(4, 2, 64, torch.float64, cuda=False), "dtype=torch.float64 is not one of"),
        (lambda p: default_task("encode"), "kind='encode' is not one of ('decode', 'prefill')"),
    ],
)
def test_bad_values_are_refused_with_the_value(tmp_path, call, message):
    with pytest.raises(ValueError) as error:
        call(tmp_path)
    assert message in str(error.value)
