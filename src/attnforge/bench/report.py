"""Result files: JSON (everything, raw samples included), CSV summary, Markdown tables, PNG plots.

`save(doc, out_dir, stem)` writes `<stem>.json/.csv/.md/.png` for a kernel-sweep or end-to-end document
(`doc["what"]` is "kernels" or "e2e"). bench/performance.py builds docs/performance.md and the README's
results section from these files: numbers in docs are never typed by hand. Plots need matplotlib
(`pip install attnforge[plots]`); without it they are skipped with a message.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import statistics
from pathlib import Path

README_START = "<!-- attnforge:performance:start -->"
README_END = "<!-- attnforge:performance:end -->"
SPEED_NOTE = "Random weights: speed does not depend on weight values."


def run_environment() -> dict:
    """`environment_report()` for a result file; where the tree is not a git checkout (a copy on a remote
    machine), the commit comes from ATTNFORGE_GIT_COMMIT, and the file says so."""
    from attnforge.environment import environment_report

    env = environment_report()
    if env.get("git_commit") is None and os.environ.get("ATTNFORGE_GIT_COMMIT"):
        env["git_commit"] = os.environ["ATTNFORGE_GIT_COMMIT"]
        env["git_commit_source"] = (
            "ATTNFORGE_GIT_COMMIT (the run's tree was a copy of this commit's checkout)"
        )
    return env


def _finite(value):
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(_finite(doc), indent=1, default=str, allow_nan=False) + "\n")
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    """One line per dict; columns are the union of keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _fmt_csv(row.get(key)) for key in columns})
    return path


def _fmt_csv(value):
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else value


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def environment_lines(doc: dict) -> list[str]:
    env = doc.get("environment", {})
    device = env.get("gpu") or "CPU only"
    lines = [
        f"- Device: {device} (driver {env.get('driver')}, CUDA {env.get('cuda')}); torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}; commit {env.get('git_commit')}",
        f"- Created: {doc.get('created')}",
    ]
    ceilings = doc.get("ceilings")
    if ceilings:
        lines.append(
            f"- Ceilings measured in this run: read {ceilings['read_gbps']:.0f} GB/s, "
            f"bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s"
        )
    if doc.get("method"):
        lines.append(f"- Method: {doc['method']}")
    if doc.get("note"):
        lines.append(f"- **Note: {doc['note']}**")
    return lines


# ----------------------------------------------------------------------------------------------------------
# Kernel sweep


def _cell_text(cell: dict) -> str:
    status = cell["status"]
    if "median_us" in cell:
        return _num(cell["median_us"]) + (f" ({cell['tflops']:.0f} TFLOP/s)" if "tflops" in cell else "")
    return {"correct": "ok (untimed)", "incorrect": "**INCORRECT**", "error": "**ERROR**"}.get(status, "n/a")


def kernel_csv_rows(doc: dict) -> list[dict]:
    lines = []
    for row in doc["rows"]:
        for name, cell in row["providers"].items():
            speedups = row.get("speedups", {}).get(name, {})
            lines.append(
                {
                    **{k: v for k, v in row["config"].items()},
                    "provider": name,
                    "status": cell["status"],
                    "median_us": cell.get("median_us"),
                    "ci95_low_us": (cell.get("ci95_us") or [None, None])[0],
                    "ci95_high_us": (cell.get("ci95_us") or [None, None])[1],
                    "samples": cell.get("n"),
                    "floor_us": row.get("floor_us"),
                    "bound": row.get("bound"),
                    "pct_of_floor": cell.get("pct_of_floor"),
                    "tflops": cell.get("tflops"),
                    "speedup_vs_best_torch": speedups.get("best-torch"),
                    "graph_median_us": cell.get("graph_median_us"),
                    "max_rel_l2": cell.get("max_rel_l2"),
                    "reason": cell.get("reason", ""),
                }
            )
    return lines


def kernel_markdown(doc: dict) -> str:
    """The kernel sweep as a Markdown report: environment, one row per shape, speed-up summary, problems."""
    parts = [
        f"# Kernel sweep ({len(doc['rows'])} rows)",
        "",
        *environment_lines(doc),
        "",
        "Times in microseconds (median). Speed-up = baseline time / attnforge kernel time.",
        "",
        _kernel_table(doc),
    ]
    parts += _speedup_summary_markdown(doc)
    parts += _graph_markdown(doc)
    parts += _problems_markdown(doc)
    if doc.get("not_run"):
        parts += ["", f"## Not run (time budget): {len(doc['not_run'])} rows", ""]
        parts += [f"- {label}" for label in doc["not_run"]]
    return "\n".join(parts) + "\n"


def _kernel_table(doc: dict) -> str:
    names = list(doc["providers"])
    header = ["row", "floor us", *names, "kernel % of floor", "kernel vs best torch"]
    table = []
    for row in doc["rows"]:
        cells = row["providers"]
        kernel = cells.get(row["kernel"], {})
        speedup = row.get("speedups", {}).get(row["kernel"], {})
        best = speedup.get("best-torch")
        best_text = f"{best:.2f}x ({speedup['best-torch-name']})" if best else ""
        table.append(
            [
                row["label"],
                f"{_num(row.get('floor_us'))} {row.get('bound', '')}".strip(),
                *(_cell_text(cells[n]) if n in cells else "" for n in names),
                _num(kernel.get("pct_of_floor"), 0),
                best_text,
            ]
        )
    return markdown_table(header, table)


SUMMARY_STATS = ("mean", "geomean", "median", "min", "max")


def _speedup_summary_markdown(doc: dict) -> list[str]:
    summary = doc["summary"]["speedups"]
    if not summary:
        return []
    head = ["candidate", "vs", "rows", *SUMMARY_STATS, "wins", "losses", "ties"]
    lines = [
        [
            candidate,
            baseline,
            s["count"],
            *(_num(s[k], 2) for k in SUMMARY_STATS),
            s["wins"],
            s["losses"],
            s["ties"],
        ]
        for candidate, by_baseline in summary.items()
        for baseline, s in by_baseline.items()
        if s["count"]
    ]
    return ["", "## Speed-up summary (wins/losses: beyond +-5%)", "", markdown_table(head, lines)]


def _graph_markdown(doc: dict) -> list[str]:
    rows = [row for row in doc["rows"] if row.get("graph_speedups")]
    if not rows:
        return []
    names = [n for n in doc["providers"] if any("graph_median_us" in r["providers"].get(n, {}) for r in rows)]
    table = []
    for row in rows:
        speedup = row["graph_speedups"].get(row["kernel"], {})
        best = speedup.get("best-torch")
        table.append(
            [
                row["label"],
                *(_num(row["providers"].get(n, {}).get("graph_median_us"), 2) for n in names),
                f"{best:.2f}x ({speedup['best-torch-name']})" if best else "",
            ]
        )
    return [
        "",
        f"## Decode per call inside a CUDA graph ({rows[0]['graph']})",
        "",
        markdown_table(["row", *names, "kernel vs best torch"], table),
    ]


def _problems_markdown(doc: dict) -> list[str]:
    parts = []
    incorrect = doc["summary"]["incorrect"]
    if incorrect:
        parts += ["", "## Incorrect (never timed)", ""]
        parts += [f"- {item['provider']} on {item['row']}: {item['reason']}" for item in incorrect]
    reasons: dict[str, set[str]] = {}
    for row in doc["rows"]:
        for name, cell in row["providers"].items():
            if cell["status"] == "n/a":
                reasons.setdefault(name, set()).add(cell["reason"])
            if cell.get("note"):
                reasons.setdefault(name, set()).add(f"note: {cell['note']}")
    if reasons:
        parts += ["", "## n/a reasons", ""]
        parts += [f"- {name}: {'; '.join(sorted(why))}" for name, why in reasons.items()]
    return parts


def kernel_plot(doc: dict, path: Path) -> Path:
    """Speed-up of attnforge's kernel over the fastest correct torch path against the sequence length, one
    panel per phase in the result and one line per head pattern and head dim (plain bf16 rows: no ragged or
    padded batches; prefill rows square, whatever their batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _plot_series(doc)
    phases = sorted({phase for phase, _ in series}) or ["decode"]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for axis, phase in zip(axes[0], phases, strict=True):
        for (_, name), points in sorted((key, p) for key, p in series.items() if key[0] == phase):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("KV length" if phase == "decode" else "sequence length (batch x length fixed)")
        axis.set_ylabel("speed-up over the fastest torch path")
        axis.set_title(f"{phase}, bf16")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_series(doc: dict) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(phase, "B1 GQA-4:1 d128") -> [(length, speed-up over the best torch path)] for the plottable rows."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in doc["rows"]:
        c = row["config"]
        value = row.get("speedups", {}).get(row["kernel"], {}).get("best-torch")
        square = c["phase"] == "decode" or c["q_len"] == c["kv_len"]
        if value is None or c["ragged"] or c.get("padded") or not square or c["dtype"] != "bfloat16":
            continue
        batch = f"B{c['batch']} " if c["phase"] == "decode" else ""
        name = f"{batch}{c['num_heads']}:{c['num_kv_heads']} d{c['head_dim']}"
        if c["phase"] == "decode" and c["q_len"] > 1:
            name += f" Lq={c['q_len']}"
        series.setdefault((c["phase"], name), []).append((c["kv_len"], value))
    return series


# ----------------------------------------------------------------------------------------------------------
# End-to-end

E2E_METRICS = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "median_token_tok_s", "total_s", "peak_mem_gib")
# attnforge / baseline per scenario (peak memory is shown, not compared), and for runs that took turns token
# by token the paired step ratio (e2e.paired_step_ratio)
E2E_RATIOS = (*E2E_METRICS[:5], "paired_step_tok_s")


def e2e_csv_rows(doc: dict) -> list[dict]:
    lines = []
    for result in doc["scenarios"]:
        for side, runs in result["sides"].items():
            line = {
                "model": doc.get("model"),
                "scenario": result["name"],
                "category": result["category"],
                "side": side,
                "prompt_tokens": result["prompt_tokens"],
                "new_tokens": result["new_tokens"],
                "runs": runs.get("n"),
            }
            for metric in E2E_METRICS:
                summary = runs.get("summary", {}).get(metric)
                if summary:
                    line[f"{metric}_median"] = summary["median"]
                    line[f"{metric}_ci95"] = f"{summary['ci95_low']:.4g}..{summary['ci95_high']:.4g}"
            line["improvement_decode"] = result.get("improvement", {}).get("decode_tok_s")
            lines.append(line)
    return lines


def _metric_text(runs: dict, metric: str, digits: int = 1) -> str:
    summary = runs.get("summary", {}).get(metric)
    if not summary:
        return ""
    low, high = summary["ci95_low"], summary["ci95_high"]
    return f"{summary['median']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


E2E_HEADER = (
    "scenario",
    "prompt",
    "new",
    "side",
    "TTFT ms",
    "prefill tok/s",
    "decode tok/s",
    "median token tok/s",
    "total s",
    "peak GiB",
)
E2E_IMPROVEMENT_HEADER = (
    "scenario",
    "TTFT (lower better)",
    "prefill tok/s",
    "decode tok/s",
    "median token tok/s",
    "total time (lower better)",
    "paired step tok/s",
)


def e2e_markdown(doc: dict) -> str:
    """The end-to-end document as a Markdown report: environment, per-scenario table, attnforge / baseline."""
    parts = [
        f"# End-to-end: {doc.get('model')} ({doc.get('mode')})",
        "",
        *environment_lines(doc),
        f"- {SPEED_NOTE}",
        f"- Tokens: {doc.get('tokenization')}",
        f"- attnforge side: kernels={doc.get('kernel_policy', 'measured')} (measured: the optimizer's choice "
        "from the tuning table; all: attnforge kernels wherever they support the call)",
        "",
    ]
    if "tokens_match" in doc:  # no GPU: the agreement check, nothing timed
        verdict = "identical" if doc["tokens_match"] else "DIFFERENT"
        parts += [f"Greedy tokens of plain transformers and attnforge: {verdict}."]
    else:
        parts += [
            "Median [95% interval of the median] over the measured runs.",
            "",
            markdown_table(list(E2E_HEADER), e2e_table_rows(doc)),
        ]
    if doc.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in doc["skipped"])]
    if doc.get("failure"):
        parts += ["", f"**FAILED: {doc['failure']}**"]
    parts += _improvement_markdown(doc)
    if doc.get("optimizer_stats"):
        parts += ["", f"Optimizer statistics on the attnforge side: `{json.dumps(doc['optimizer_stats'])}`"]
    return "\n".join(parts) + "\n"


def e2e_table_rows(doc: dict) -> list[list]:
    """One row per scenario and side, cells as in E2E_HEADER (median [95% interval])."""
    return [
        [
            result["name"],
            result["prompt_tokens"],
            result["new_tokens"],
            side,
            _metric_text(runs, "ttft_ms"),
            _metric_text(runs, "prefill_tok_s", 0),
            _metric_text(runs, "decode_tok_s"),
            _metric_text(runs, "median_token_tok_s"),
            _metric_text(runs, "total_s", 2),
            _metric_text(runs, "peak_mem_gib", 2),
        ]
        for result in doc["scenarios"]
        for side, runs in result["sides"].items()
    ]


def paired_step_ratio(sides: dict) -> float | None:
    """Median over pairs of adjacent decode steps of baseline ms / attnforge ms (> 1: attnforge faster), for
    runs whose sides took turns token by token (each run records its "turn"), else None.

    Step j of the two sides' run i ran one right after the other, so each pair meets the same state of the
    host, which on the GPU machines changes for seconds at a time.
    """
    baseline = sides.get("baseline", {}).get("runs", [])
    optimized = sides.get("attnforge", {}).get("runs", [])
    if not baseline or len(baseline) != len(optimized) or not all("turn" in run for run in baseline):
        return None
    ratios = [
        base / ours
        for base_run, our_run in zip(baseline, optimized, strict=True)
        # one side may have one step more than the other (an odd number of steps)
        for base, ours in zip(base_run.get("token_ms", []), our_run.get("token_ms", []), strict=False)
        if base > 0 and ours > 0
    ]
    return statistics.median(ratios) if ratios else None


def e2e_improvement_rows(doc: dict) -> list[list]:
    """attnforge / baseline per scenario, cells as in E2E_IMPROVEMENT_HEADER (the paired step ratio derived
    from the runs where a file predates it)."""
    rows = []
    for r in doc["scenarios"]:
        if not r.get("improvement"):
            continue
        ratios = r["improvement"]
        if "paired_step_tok_s" not in ratios:  # a file from before the ratio was recorded
            ratios = {**ratios, "paired_step_tok_s": paired_step_ratio(r["sides"])}
        rows.append([r["name"], *(f"{ratios[m]:.3f}x" if ratios.get(m) else "" for m in E2E_RATIOS)])
    return rows


def _improvement_markdown(doc: dict) -> list[str]:
    improvements = e2e_improvement_rows(doc)
    if not improvements:
        return []
    parts = [
        "",
        "## attnforge / baseline (ratio > 1 is better for attnforge)",
        "",
        markdown_table(list(E2E_IMPROVEMENT_HEADER), improvements),
    ]
    if doc.get("overall"):
        parts += [
            "",
            "Overall (geometric mean over scenarios): "
            + ", ".join(f"{k} {v:.3f}x" for k, v in doc["overall"].items() if v is not None),
        ]
    return parts


def e2e_plot(doc: dict, path: Path) -> Path:
    """Decode tok/s per scenario, one bar per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in doc["scenarios"]]
    sides = sorted({side for r in doc["scenarios"] for side in r["sides"]})
    fig, axis = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4.5))
    width = 0.8 / max(1, len(sides))
    for i, side in enumerate(sides):
        values = []
        for r in doc["scenarios"]:
            summary = r["sides"].get(side, {}).get("summary", {}).get("decode_tok_s")
            values.append(summary["median"] if summary else 0.0)
        axis.bar([j + i * width for j in range(len(names))], values, width=width, label=side)
    axis.set_xticks(
        [j + width * (len(sides) - 1) / 2 for j in range(len(names))], names, rotation=45, ha="right"
    )
    axis.set_ylabel("decode tokens/s (median)")
    axis.set_title(f"{doc.get('model')}: decode tok/s per scenario ({SPEED_NOTE.lower()[:-1]})", fontsize=9)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Saving and regenerating docs


def save(doc: dict, out_dir: Path | str, stem: str) -> tuple[list[Path], list[str]]:
    """Write `<stem>.json/.csv/.md/.png` under out_dir; returns (paths written, messages on skipped ones)."""
    if doc.get("what") not in ("kernels", "e2e"):
        raise ValueError(
            f"doc['what']={doc.get('what')!r} is not a result document; accepted: 'kernels', 'e2e'"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", stem):
        raise ValueError(f"stem={stem!r} must be a plain file name (letters, digits, '.', '_', '-')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kernels = doc["what"] == "kernels"
    paths = [
        write_json(doc, out / f"{stem}.json"),
        write_csv(kernel_csv_rows(doc) if kernels else e2e_csv_rows(doc), out / f"{stem}.csv"),
    ]
    md = out / f"{stem}.md"
    md.write_text(kernel_markdown(doc) if kernels else e2e_markdown(doc))
    paths.append(md)
    messages = []
    try:
        paths.append((kernel_plot if kernels else e2e_plot)(doc, out / f"{stem}.png"))
    except ImportError:
        messages.append("plots skipped: matplotlib is not installed (pip install 'attnforge[plots]')")
    return paths, messages


def default_stem(what: str, model: str | None = None) -> str:
    """`<what>-YYYYMMDD` (UTC), with the model name for end-to-end runs."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return f"{what}-{model}-{today}" if model else f"{what}-{today}"


def kernel_overview(doc: dict) -> list[str]:
    """The kernel sweep in brief: per row the floor, attnforge's kernel, the fastest torch path, speed-up."""
    lines = [*environment_lines(doc), ""]
    head = ["row", "floor us", "attnforge us", "% of floor", "best torch us", "speed-up"]
    table = []
    for row in doc["rows"]:
        kernel = row["providers"].get(row["kernel"], {})
        speedup = row.get("speedups", {}).get(row["kernel"], {})
        best_name = speedup.get("best-torch-name")
        best = row["providers"].get(best_name, {}).get("median_us") if best_name else None
        table.append(
            [
                row["label"],
                _num(row.get("floor_us")),
                _cell_text(kernel) if kernel else "",
                _num(kernel.get("pct_of_floor"), 0),
                f"{_num(best)} ({best_name})" if best_name else "",
                f"{speedup['best-torch']:.2f}x" if speedup.get("best-torch") else "",
            ]
        )
    return lines + [markdown_table(head, table)]


def update_readme(readme: Path | str, section: str) -> bool:
    """Replace the text between the performance markers in a README; False if it has no markers."""
    path = Path(readme)
    if not path.exists():
        return False
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return False
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    path.write_text(f"{before}{README_START}\n{section}{README_END}{after}")
    return True
