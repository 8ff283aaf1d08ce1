"""`attnforge demo` without a GPU: a reduced model, Triton kernels in the interpreter, checked vs eager."""

import pytest
import torch
from typer.testing import CliRunner

from attnforge.cli import app

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU demo times full models")


def test_demo_checks_a_model_and_shows_the_decisions():
    result = CliRunner().invoke(app, ["demo", "--prompt-len", "20", "--new-tokens", "3"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
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
