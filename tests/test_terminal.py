"""What `attnforge` prints is readable at 80 columns: tables fit, no raw Markdown, real metavars in --help,
and --model help names the bundled architectures. The commands run in one fresh process with COLUMNS=80 (rich
reads the width when a console is created), through typer's test runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnforge.models import bundled_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HELPS = [
    ["--help"],
    ["bench", "e2e", "--help"],
    ["demo", "--help"],
    ["tune", "--help"],
    ["generate", "--help"],
]
RUNNER = """
import json, sys
from typer.testing import CliRunner
from attnforge.cli import app
outputs = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    outputs.append({"args": args, "code": result.exit_code, "output": result.output})
print(json.dumps(outputs))
"""


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, str]:
    """{command line: what it printed} for info, bench report and the --help of several commands."""
    tmp = tmp_path_factory.mktemp("terminal")
    report = ["bench", "report", "--results", str(RESULTS), "--out", str(tmp / "performance.md"),
              "--readme", str(tmp / "README.md")]  # fmt: skip
    commands = [["info"], report, *HELPS]
    env = {**os.environ, "COLUMNS": "80", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    for item in outputs:
        assert item["code"] == 0, item
    return {" ".join(item["args"][:2]): item["output"] for item in outputs}


def _too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > 80]


def test_info_fits_80_columns(printed):
    assert "attnforge environment" in printed["info"] and not _too_wide(printed["info"])


def test_bench_report_table_fits_80_columns_and_no_markdown_is_printed(printed):
    text = printed["bench report"]
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and not _too_wide("\n".join(table))  # the "wrote PATH" lines are as long as the path
    assert "h100/e2e-fallback-llama3-8b-dynamic-20261127.json" in text  # names whole, not cut
    assert "| --- |" not in text


def test_bench_e2e_help_lists_the_bundled_models(printed):
    flat = " ".join(printed["bench e2e"].replace("│", " ").split())
    for name in bundled_models():
        assert name in flat


@pytest.mark.parametrize("command", [" ".join(args[:2]) for args in HELPS])
def test_help_shows_real_metavars_and_fits_80_columns(printed, command):
    text = printed[command]
    assert "<bool>" not in text and "<str>" not in text and "<int>" not in text
    assert "…" not in text and not _too_wide(text)
