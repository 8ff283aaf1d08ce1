"""`attnforge demo` without a GPU: a reduced model, Triton kernels in the interpreter, checked vs eager."""

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from attnforge.cli import app

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU demo times full models")


def test_demo_checks_a_model_and_shows_the_decisions():
    """In its own process, without TRITON_INTERPRET (the demo sets it on a CPU-only machine; an import that
    pulls in Triton first leaves every kernel refusing to run, which an in-process run would not see)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "attnforge.cli", "demo", "--prompt-len", "20", "--new-tokens", "3"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = " ".join(result.stdout.split())
    assert "No GPU here" in output
    assert "correctness protocol" in output and "correctness failures" not in output
    assert "dispatch decisions" in output and "decode" in output
    assert "PASS attnforge vs eager" in output and "DIFFERENT" not in output


def test_demo_rejects_an_unknown_model_and_cache():
    result = CliRunner().invoke(app, ["demo", "--no-protocol", "--model", "no-such-model"])
    assert result.exit_code == 2
    assert "Error: model='no-such-model' is not a bundled architecture" in result.output
    result = CliRunner().invoke(app, ["demo", "--no-protocol", "--cache", "paged"])
    assert result.exit_code != 0 and "--cache 'paged' is not one of: dynamic, static" in result.output
