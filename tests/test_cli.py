"""The first five minutes with the CLI: a bad --model answers at once in one line; `info` says how the
kernels run here, as the demo then runs them."""

import time

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from attnforge import cli

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU shows")


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "e2e", "--model", "nosuchmodel"],
        ["demo", "--model", "nosuchmodel"],
        ["demo", "--no-protocol", "--model", "owner/nosuch"],
    ],
)
def test_an_unknown_model_is_answered_at_once_in_one_line(args, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = CliRunner().invoke(cli.app, args)
    seconds = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), "no traceback"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: model='{args[-1]}' is not a bundled architecture (llama2-7b, ")
    assert "local copy" in lines[0] or "download it where there is a network" in lines[0]
    assert seconds < 2.0


@NO_GPU
def test_info_says_the_kernels_run_through_the_interpreter_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    row = cli._kernels_row()
    assert row.startswith("attnforge decode, attnforge prefill through the Triton interpreter only")
    assert "set TRITON_INTERPRET=1" in row
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    row = cli._kernels_row()
    assert row == "attnforge decode, attnforge prefill (Triton interpreter on CPU: correctness only, slow)"


@NO_GPU
def test_the_demo_reports_the_kernels_it_then_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cli, "console", Console(width=300))
    monkeypatch.setattr(cli, "_model_demo", lambda *args: True)
    result = CliRunner().invoke(cli.app, ["demo", "--no-protocol"])
    assert result.exit_code == 0, result.output
    assert "attnforge decode, attnforge prefill (Triton interpreter on CPU" in result.output
    assert "kernels: none" not in result.output
