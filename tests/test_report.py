"""`attnforge bench report` regenerates every committed table from the committed JSON, byte for byte: a fresh
clone (here: a copy of the results in a temporary directory) gets docs/performance.md, the README's results
section and each result's own Markdown exactly as committed."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnforge.bench import performance, report
from attnforge.bench.cli import bench_app

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _readme_section(text: str) -> str:
    return text.split(report.README_START, 1)[1].split(report.README_END, 1)[0]


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """The committed results, README and docs/performance.md copied to tmp_path, which becomes the cwd."""
    shutil.copytree(RESULTS, tmp_path / "benchmarks" / "results")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "docs" / "performance.md").write_text("stale\n")
    readme = tmp_path / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace(_readme_section(text), "\nstale\n"))
    for md in performance.file_tables(tmp_path / "benchmarks" / "results"):
        md.write_text("stale\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_bench_report_regenerates_the_committed_tables_byte_for_byte(fresh_clone):
    result = CliRunner().invoke(bench_app, ["report"])
    assert result.exit_code == 0, result.output
    committed = (ROOT / "docs" / "performance.md").read_text()
    assert (fresh_clone / "docs" / "performance.md").read_text() == committed
    regenerated = _readme_section((fresh_clone / "README.md").read_text())
    assert regenerated == _readme_section((ROOT / "README.md").read_text())
    tables = performance.file_tables(fresh_clone / "benchmarks" / "results")
    kinds = {doc["what"] for _, doc in performance.load_results(fresh_clone / "benchmarks" / "results")}
    assert kinds - {"overhead", "evolve-evaluate"} <= set(performance.PER_FILE_MARKDOWN), kinds
    assert len(tables) >= 60, "every result with a table of its own is regenerated"
    for path, text in tables.items():
        committed = RESULTS / path.relative_to(fresh_clone / "benchmarks" / "results")
        assert path.read_text() == committed.read_text() == text, path


def test_the_generated_docs_hold_no_absolute_path_and_cover_every_result_file():
    text = performance.performance_markdown(RESULTS, label="benchmarks/results")
    assert str(ROOT) not in text and "/tmp" not in text
    for path in RESULTS.glob("*/*.json"):
        assert f"`{path.parent.name}/{path.name}`" in text, path


def test_a_json_file_that_is_not_a_result_is_refused_with_the_reason(tmp_path):
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "old.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="old.json has no 'what' field: not a result file of"):
        performance.performance_markdown(tmp_path)


def test_the_committed_docs_are_up_to_date():
    assert (ROOT / "docs" / "performance.md").read_text() == performance.performance_markdown(
        RESULTS, label="benchmarks/results"
    )
    assert _readme_section((ROOT / "README.md").read_text()) == "\n" + performance.readme_markdown(RESULTS)


def test_bench_report_without_results_exits_1(tmp_path):
    out = tmp_path / "performance.md"
    result = CliRunner().invoke(bench_app, ["report", "--results", str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 1 and "no result files" in result.output and not out.exists()


def test_an_accelerated_generation_run_is_summarised_with_its_targets():
    text = performance.performance_markdown(RESULTS, label="benchmarks/results")
    assert "| batch 1, prompt 128, 256 new | attnforge | 717.7 | 62.3 | 27.8 |" in text
    assert "- Target >= 1000 tok/s (batch 1, prompt 128, 256 new): 717.75, NOT met" in text
    index = performance.readme_markdown(RESULTS)
    assert "qwen3-0.6b: attnforge 718 (batch 1, prompt 128, 256 new)" in index
    assert "targets met 0 of 4" in index
    # a file with only a variant of the accelerator (coordinate-descent tuning) is headed by that row
    assert "qwen3-0.6b: attnforge-tune 945 (batch 1, prompt 128, 256 new)" in index


def _plot_row(phase, q_len, kv_len, speedup, batch=1, ragged=False, padded=False, dtype="bfloat16"):
    config = dict(phase=phase, batch=batch, num_heads=32, num_kv_heads=8, head_dim=128, q_len=q_len,
                  kv_len=kv_len, ragged=ragged, padded=padded, dtype=dtype)  # fmt: skip
    speedups = {} if speedup is None else {"k": {"best-torch": speedup, "best-torch-name": "sdpa-auto"}}
    return {"config": config, "kernel": "k", "speedups": speedups}


def test_the_plot_draws_one_line_per_pattern_and_phase_from_plain_rows():
    rows = [
        _plot_row("decode", 1, 1024, 1.2), _plot_row("decode", 1, 4096, 1.1),
        _plot_row("decode", 1, 4096, 1.5, batch=8), _plot_row("decode", 4, 4096, 1.8),
        _plot_row("decode", 1, 4096, 2.0, ragged=True), _plot_row("decode", 1, 4096, None),  # never timed
        _plot_row("prefill", 512, 512, 0.6, batch=32), _plot_row("prefill", 2048, 2048, 0.8, batch=8),
        _plot_row("prefill", 512, 4608, 1.6), _plot_row("prefill", 1024, 1024, 3.0, batch=16, padded=True),
        _plot_row("prefill", 1024, 1024, 0.9, dtype="float16"),
    ]  # fmt: skip
    assert report._plot_series({"rows": rows}) == {
        ("decode", "B1 32:8 d128"): [(1024, 1.2), (4096, 1.1)],
        ("decode", "B8 32:8 d128"): [(4096, 1.5)],
        ("decode", "B1 32:8 d128 Lq=4"): [(4096, 1.8)],
        ("prefill", "32:8 d128"): [(512, 0.6), (2048, 0.8)],  # square rows whatever their batch
    }
