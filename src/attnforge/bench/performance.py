"""docs/performance.md and the README's results section, regenerated from committed result files only.

`performance_markdown(results_dir)` summarises every JSON result under `<results_dir>/<gpu>/` by its kind
(`doc["what"]`: kernels, e2e, tuning, overhead, evolve-evaluate; other kinds are listed with a pointer to
their own Markdown); a JSON file without a `what` field is refused (it is not one of the pipeline's).
`readme_markdown(results_dir)` is the short index the README carries between its markers.
`regenerate_file_tables(results_dir)` rewrites the per-run Markdown beside each JSON (`<stem>.md`).
The output names files relative to the results directory and holds no timestamps of its own, so a fresh clone
regenerates it byte for byte (tests/test_report.py checks this).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from attnforge.bench import accel_tables, report, tune

README_START = report.README_START
README_END = report.README_END
KIND_TITLES = {
    "kernels": "kernel sweep",
    "e2e": "end-to-end generation",
    "tuning": "tuning sweep",
    "overhead": "fallback overhead per call",
    "evolve-evaluate": "evolve: evaluation of a program",
    "accelerate": "accelerated generation",
}


def load_results(results_dir: Path | str) -> list[tuple[Path, dict]]:
    """Every `<gpu>/*.json` under results_dir, sorted by path: (path, document); ValueError for a file that
    is not a result of the pipeline (unreadable, or no `what` field)."""
    found = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable result file: {error}") from None
        if not (isinstance(doc, dict) and doc.get("what")):
            raise ValueError(f"{path} has no 'what' field: not a result file of `attnforge bench` or `tune`")
        found.append((path, doc))
    return found


def _relative(path: Path, results_dir: Path | str) -> str:
    return path.relative_to(Path(results_dir)).as_posix()


# ----------------------------------------------------------------------------------------------------------
# One summary per kind: each returns Markdown lines (no heading)


def _environment_line(doc: dict) -> str:
    env = doc.get("environment", {})
    device = env.get("gpu") or "CPU only"
    line = (
        f"- Device: {device}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}; commit {env.get('git_commit')}"
    )
    ceilings = doc.get("ceilings") or {}
    measured = [
        f"read {ceilings['read_gbps']:.0f} GB/s" if ceilings.get("read_gbps") else "",
        f"bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s" if ceilings.get("bf16_tflops") else "",
    ]
    measured = [text for text in measured if text]
    return line + (f"; ceilings measured in the run: {', '.join(measured)}" if measured else "")


def _kernels_summary(doc: dict) -> list[str]:
    return report.environment_lines(doc) + [""] + report.kernel_overview(doc)


def _e2e_summary(doc: dict) -> list[str]:
    lines = report.e2e_markdown(doc).split("\n", 2)[2].rstrip().splitlines()
    return [f"##{line}" if line.startswith("## ") else line for line in lines]  # headings under the file's


def _tuning_summary(doc: dict) -> list[str]:
    header = ["target", "bucket", "best", "us", "best torch us", "speed-up", "graph speed-up"]
    table = []
    for row in doc["rows"]:
        if row.get("speedup") is None:
            table.append([row["label"], row["bucket"], "not timed", "", "", "", ""])
            continue
        _, graph = tune.graph_columns(row)
        table.append(
            [
                row["label"],
                row["bucket"],
                row["best"],
                report._num(row["best_us"]),
                f"{report._num(row['torch_us'])} ({row['best_torch']})",
                f"{row['speedup']:.2f}x",
                "" if graph == "-" else graph,
            ]
        )
    lines = [_environment_line(doc), f"- Method: {doc['method']}", ""]
    return lines + [report.markdown_table(header, table)]


def _accelerate_summary(doc: dict) -> list[str]:
    """Per scenario and row: decode tok/s per sequence, TTFT, % of the weights-only roofline; the targets."""
    header = ["scenario", "row", "tok/s per seq", "TTFT ms", "% roofline"]
    table = [
        [
            row["scenario"],
            row["row"],
            report._num(row.get("decode_tok_s")),
            report._num(row.get("ttft_ms")),
            report._num(row.get("pct_of_roofline")),
        ]
        for row in doc["rows"]
    ]
    targets = [
        f"- Target {t['target']} ({t['scenario']}): {t['measured']:.2f}, {'met' if t['met'] else 'NOT met'}"
        for t in doc.get("targets", [])
    ]
    lines = [_environment_line(doc), f"- Model: {doc.get('model')} ({doc.get('weights')} weights)"]
    return lines + [f"- Method: {doc['method']}", ""] + [report.markdown_table(header, table), ""] + targets


def overhead_sentence(doc: dict, suffix: str = "us") -> str:
    """One `attnforge bench overhead` figure in words: suffix "us" (hot loop) or "cold_us" (caches swept)."""
    added = doc[f"overhead_{suffix}"]
    direction = "more" if added >= 0 else "less"
    return (
        f"transformers' sdpa path {doc[f'transformers_sdpa_{suffix}']:.1f} us per call, through attnforge's "
        f"hook {doc[f'attnforge_hook_{suffix}']:.1f} us: {abs(added):.1f} us {direction} through attnforge "
        f"({doc.get('cpu')}, torch {doc.get('torch')})"
    )


def _overhead_summary(doc: dict) -> list[str]:
    runs = [("", "us")] + ([("caches swept between calls: ", "cold_us")] if "overhead_cold_us" in doc else [])
    return [f"- {label}{overhead_sentence(doc, suffix)}" for label, suffix in runs] + [
        f"- Method: {doc.get('method')}"
    ]


def _evolve_evaluate_summary(doc: dict) -> list[str]:
    metrics, artifacts = doc.get("metrics", {}), doc.get("artifacts", {})
    lines = [
        _environment_line(doc),
        f"- Program `{doc.get('program')}`, subset {doc.get('subset')}: "
        f"score {metrics.get('combined_score')}, "
        f"{metrics.get('cases_passed')}/{metrics.get('cases_total')} cases passed, worst relative L2 "
        f"{metrics.get('worst_rel_l2'):.2g}; {artifacts.get('reason')}",
    ]
    if artifacts.get("timing"):
        lines.append(f"- Timing: {artifacts['timing']}")
    generation = doc.get("generation") or {}
    if generation.get("summary"):
        lines.append(f"- In a model ({generation.get('model')}): {generation['summary']}")
    return lines


SUMMARIES: dict[str, Callable[[dict], list[str]]] = {
    "kernels": _kernels_summary,
    "e2e": _e2e_summary,
    "tuning": _tuning_summary,
    "overhead": _overhead_summary,
    "evolve-evaluate": _evolve_evaluate_summary,
    "accelerate": _accelerate_summary,
}


def _file_section(path: Path, doc: dict, results_dir: Path | str) -> list[str]:
    name = _relative(path, results_dir)
    kind = doc["what"]
    summary = SUMMARIES.get(kind)
    if summary is None:
        beside = path.with_suffix(".md")
        where = f"see `{_relative(beside, results_dir)}`" if beside.exists() else "no table"
        return ["", f"### `{name}` ({kind})", "", f"- No summary for kind {kind!r} here; {where}."]
    return ["", f"### `{name}` ({KIND_TITLES[kind]})", "", *summary(doc)]


def performance_markdown(results_dir: Path | str, label: str | None = None) -> str:
    """docs/performance.md: every result file under results_dir summarised by kind.

    `label` names the directory in the text (default: results_dir as given); raises ValueError when the
    directory holds no result file at all.
    """
    results = load_results(results_dir)
    if not results:
        raise ValueError(f"no result files (<gpu>/*.json) under {results_dir}")
    parts = [
        "# Performance",
        "",
        f"Generated by `attnforge bench report` from the JSON result files under `{label or results_dir}`; "
        f"do not edit by hand. {report.SPEED_NOTE}",
    ]
    for gpu in sorted({path.parent.name for path, _ in results}):
        current = [(path, doc) for path, doc in results if path.parent.name == gpu]
        if current:
            parts += ["", f"## {gpu}"]
        for path, doc in current:
            parts += _file_section(path, doc, results_dir)
    return "\n".join(parts) + "\n"


def _headline(doc: dict) -> str:
    """One line on what a result file shows (README index)."""
    kind = doc["what"]
    if kind == "e2e":
        overall = (doc.get("overall") or {}).get("decode_tok_s")
        ratio = f"; decode tok/s attnforge / baseline {overall:.3f}x (geometric mean)" if overall else ""
        return f"{doc.get('model')}, {doc.get('cache')} cache, kernels={doc.get('kernel_policy')}{ratio}"
    if kind == "tuning":
        timed = [row["speedup"] for row in doc["rows"] if row.get("speedup") is not None]
        wins = sum(speedup > 1.05 for speedup in timed)
        return f"{len(doc['rows'])} targets, the best candidate faster than torch by > 5% on {wins}"
    if kind == "kernels":
        speedups = [
            row["speedups"][row["kernel"]]["best-torch"]
            for row in doc["rows"]
            if row.get("speedups", {}).get(row["kernel"], {}).get("best-torch")
        ]
        if not speedups:
            return f"{len(doc['rows'])} rows"
        return (
            f"{len(doc['rows'])} rows; vs the fastest torch path {min(speedups):.2f}x to {max(speedups):.2f}x"
        )
    if kind == "overhead":
        cold = f" ({doc['overhead_cold_us']:+.1f} us cold)" if "overhead_cold_us" in doc else ""
        return f"a call routed to torch through attnforge: {doc['overhead_us']:+.1f} us against plain{cold}"
    if kind == "evolve-evaluate":
        score, reason = doc.get("metrics", {}).get("combined_score"), doc.get("artifacts", {}).get("reason")
        return f"score {score} ({reason})"
    if kind == "accelerate":  # the plain accelerator's row, else the first variant of it in the file
        names = [row["row"] for row in doc["rows"] if row["row"].startswith("attnforge")]
        name = "attnforge" if "attnforge" in names else next(iter(names), "attnforge")
        ours = [f"{row['decode_tok_s']:.0f} ({row['scenario']})" for row in doc["rows"]
                if row["row"] == name and row.get("decode_tok_s")]  # fmt: skip
        met = sum(t["met"] for t in doc.get("targets", []))
        return (f"{doc.get('model')}: {name} {', '.join(ours) or 'not run'} tok/s per sequence; "
                f"targets met {met} of {len(doc.get('targets', []))}")  # fmt: skip
    return KIND_TITLES.get(kind, kind)


def readme_markdown(results_dir: Path | str) -> str:
    """The README's generated index: one line per result file, details in docs/performance.md."""
    results = load_results(results_dir)
    lines = ["Generated by `attnforge bench report`; the tables are in `docs/performance.md`.", ""]
    for path, doc in results:
        name = _relative(path, results_dir)
        lines.append(f"- `{name}` ({KIND_TITLES.get(doc['what'], doc['what'])}): {_headline(doc)}")
    return "\n".join(lines) + "\n"


def file_kinds(results_dir: Path | str) -> list[tuple[str, str]]:
    """(file relative to results_dir, its kind) for every result file, in the docs' order."""
    return [(_relative(path, results_dir), doc["what"]) for path, doc in load_results(results_dir)]


PER_FILE_MARKDOWN: dict[str, Callable[[dict], str]] = {
    "e2e": report.e2e_markdown,
    "tuning": tune.markdown,
    "kernels": report.kernel_markdown,
    "accelerate": accel_tables.accel_markdown,
    "quant-decode": accel_tables.speed_markdown,
    "quant-quality": accel_tables.quality_markdown,
}


def file_tables(results_dir: Path | str) -> dict[Path, str]:
    """The per-run Markdown each JSON's kind writes beside it ({<stem>.md path: text}), for every kind that
    has one (PER_FILE_MARKDOWN: all but the overhead and evolve kinds)."""
    tables = {}
    for path, doc in load_results(results_dir):
        writer = PER_FILE_MARKDOWN.get(doc["what"])
        if writer is not None:
            tables[path.with_suffix(".md")] = writer(doc)
    return tables


def regenerate_file_tables(results_dir: Path | str) -> list[Path]:
    """Rewrite each `<stem>.md` beside a result JSON (`file_tables`); returns the files whose text changed."""
    changed = []
    for path, text in file_tables(results_dir).items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def update_readme(readme: Path | str, section: str) -> bool:
    """Replace the text between the performance markers in a README; False if it has no markers."""
    return report.update_readme(readme, section)
