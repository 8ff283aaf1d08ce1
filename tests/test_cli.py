"""The first five minutes with the CLI: a bad --model answers at once, in one line."""

import time

import pytest
from typer.testing import CliRunner

from attnforge import cli


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
