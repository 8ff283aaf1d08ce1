"""`attnforge bench kernels | e2e | report`: the benchmark commands (mounted by attnforge/cli.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnforge.bench import report

bench_app = typer.Typer(help="Benchmarks: kernel sweep, end-to-end scenarios, reports.", no_args_is_help=True)
console = Console()
RESULTS_DIR = Path("benchmarks/results")
CACHE_HINT = "$ATTNFORGE_CACHE_DIR or ~/.cache/attnforge, results/<gpu>"
BACKENDS = ("torch", "mlx")


def results_root() -> Path:
    """Where results go when the user names no directory: the user's cache, never the source tree."""
    from attnforge.models import cache_dir

    return cache_dir() / "results"


def device_results_dir() -> Path:
    """results_root()/<device key> (h100, h200, cpu): the default folder of every result file."""
    from attnforge.kernels.tuning import gpu_key

    return results_root() / gpu_key()


def require_model(model: str) -> None:
    """Exit at once (status 2) with one line, no traceback, when `model` cannot be loaded here: not bundled,
    not a local path, and a hub id with no local copy while the hub is unreachable."""
    from attnforge.models import ModelNotFoundError, model_source

    try:
        model_source(model)
    except ModelNotFoundError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2) from None


def _use_interpreter_without_gpu() -> None:
    """Without a GPU, Triton kernels can only run under the interpreter (set before any kernel import)."""
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        console.print("[yellow]No CUDA GPU: Triton kernels run under TRITON_INTERPRET=1 (correctness only).")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[row]}"),
        console=console,
    )


def _save(doc: dict, out: Path, stem: str) -> None:
    paths, messages = report.save(doc, out, stem)
    for message in messages:
        console.print(f"[yellow]{escape(message)}")
    console.print("wrote " + ", ".join(str(p) for p in paths))


@bench_app.command()
def kernels(
    preset: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="decode, prefill (causal, chunked against a cache, padded batches; torch's varlen), grid "
            "(every kind) or sweep (prefill launch parameters; `attnforge tune` stores winners). Tiny sizes "
            "without a GPU.",
        ),
    ] = "grid",
    only: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Only the preset's rows whose label contains TEXT.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help=f"Result directory (default: {CACHE_HINT}).")
    ] = None,
    providers: Annotated[
        str | None, typer.Option(help="Comma-separated provider names (default: all).")
    ] = None,
    reps: Annotated[int, typer.Option(min=3, help="Timed samples per provider and row.")] = 50,
    time_budget: Annotated[
        float | None, typer.Option(help="Stop starting new rows after this many seconds.")
    ] = None,
    stem: Annotated[
        str | None,
        typer.Option(
            help="File name stem (default: <what>-YYYYMMDD, what: decode, prefill, kernels or prefill-sweep)."
        ),
    ] = None,
) -> None:
    """Kernel sweep: correctness of every provider on every row of a preset, then timings (GPU) with floors
    (and TFLOP/s for prefill rows). The JSON is rewritten after every row."""
    from attnforge.bench import kernels as sweep

    grid, chosen = _kernel_rows_and_providers(preset, only, providers)
    if not torch.cuda.is_available():
        console.print(f"[yellow]{sweep.NO_GPU_NOTE}.")
    out_dir, stem = out or device_results_dir(), stem or report.default_stem(_KERNEL_STEMS[preset])

    def checkpoint(partial: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write_json({**partial, "preset": preset}, out_dir / f"{stem}.json")

    with _progress() as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        task = progress.add_task("kernel sweep", total=len(grid), row="")
        if torch.cuda.is_available():
            progress.update(task, row="measuring ceilings")

        def advance(done: int, label: str) -> None:
            progress.update(task, completed=done, row=label)

        options = dict(reps=reps, time_budget_s=time_budget, progress=advance, checkpoint=checkpoint)
        doc = sweep.run_sweep(grid, providers=chosen, **options)
        progress.update(task, completed=len(grid), row="done")
    doc["preset"] = preset
    _print_kernel_summary(doc)
    _save(doc, out_dir, stem)
    if doc["summary"]["incorrect"]:
        console.print(f"[red]{len(doc['summary']['incorrect'])} incorrect provider/row cells (never timed).")


# Result file names (DESIGN.md "Result files"): <what>-YYYYMMDD with what = decode, prefill or kernels.
_KERNEL_STEMS = {"decode": "decode", "prefill": "prefill", "grid": "kernels", "sweep": "prefill-sweep"}


def _kernel_rows_and_providers(preset: str, only: str | None, names: str | None) -> tuple[list, dict]:
    """The rows of `preset` (with `only` in their label) and the chosen providers; bad values exit 2."""
    from attnforge.bench import presets
    from attnforge.bench.providers import select

    if preset not in presets.PRESETS:
        raise typer.BadParameter(
            f"{preset!r} is not one of {', '.join(presets.PRESETS)}", param_hint="--preset"
        )
    _use_interpreter_without_gpu()
    grid = presets.build_grid(preset, on_gpu=torch.cuda.is_available())
    grid = [cfg for cfg in grid if only is None or only in cfg.label]
    if not grid:
        raise typer.BadParameter(
            f"no row of preset {preset!r} has {only!r} in its label", param_hint="--only"
        )
    try:
        chosen = select(presets.preset_providers(preset), names.split(",") if names else None)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--providers") from None
    return grid, chosen


def _print_kernel_summary(doc: dict) -> None:
    from rich.table import Table

    table = Table(
        title="kernel sweep" + (" (correctness only: timings need a CUDA GPU)" if doc["note"] else "")
    )
    for column in ("row", "kernel", "status", "median us", "% floor", "vs best torch"):
        table.add_column(column)
    for row in doc["rows"]:
        cell = row["providers"].get(row["kernel"], {"status": "-"})
        speedup = row.get("speedups", {}).get(row["kernel"], {}).get("best-torch")
        style = {"correct": "green", "incorrect": "red", "error": "red"}.get(cell["status"], "yellow")
        table.add_row(
            row["label"],
            row["kernel"],
            f"[{style}]{cell['status']}",
            report._num(cell.get("median_us")),
            report._num(cell.get("pct_of_floor"), 0),
            f"{speedup:.2f}x" if speedup else "",
        )
    console.print(table)
    counts = ", ".join(f"{k}: {v}" for k, v in doc["summary"]["cells"].items())
    console.print(f"provider cells: {counts}")


def model_help() -> str:
    """`--model` help: what it accepts and the bundled architectures."""
    from attnforge.models import bundled_models

    return f"Bundled architecture ({', '.join(bundled_models())}; random weights), hub id or local path."


# `bench e2e` options, named once here so the command reads as a list of what it takes
ModelOption = Annotated[str, typer.Option(metavar="NAME", help=model_help())]
ModeOption = Annotated[
    str, typer.Option(metavar="MODE", help="quick (5 scenarios), full (20) or compare (A/B).")
]
RunsOption = Annotated[
    int | None, typer.Option(min=1, metavar="N", help="Measured runs per scenario (default 3; full: 5).")
]
WarmupOption = Annotated[
    int, typer.Option(min=0, metavar="N", help="Warm-up runs per scenario (not measured).")
]
AllScenariosOption = Annotated[
    bool, typer.Option("--all-scenarios", help="compare: all 20 scenarios instead of the quick 5.")
]
OutOption = Annotated[
    Path | None, typer.Option("--out", metavar="DIR", help=f"Result directory (default: {CACHE_HINT}).")
]
E2eStemOption = Annotated[
    str | None, typer.Option(metavar="STEM", help="File name stem (default: e2e-<model>-YYYYMMDD).")
]
TimeBudgetOption = Annotated[
    float | None, typer.Option(metavar="SECONDS", help="Stop starting new scenarios after this many seconds.")
]
KernelPolicyOption = Annotated[
    str,
    typer.Option(
        metavar="POLICY",
        help="measured: the optimizer's choice (tuning store); all: attnforge kernels where supported; "
        "none: every call to torch (the fallback's own cost).",
    ),
]
CacheOption = Annotated[
    str, typer.Option(metavar="KIND", help="dynamic, or static (transformers compiles the decode step).")
]
InterleaveOption = Annotated[
    str,
    typer.Option(
        metavar="HOW",
        help="compare: runs (whole runs take turns) or tokens (the sides take turns token by token inside "
        "each run; dynamic cache; steadier on a host whose speed drifts).",
    ),
]
PromptTokensOption = Annotated[
    int | None, typer.Option(min=1, metavar="N", help="Override every scenario's prompt length.")
]
ScenariosOption = Annotated[
    str | None,
    typer.Option("--scenarios", metavar="NAMES", help="Comma-separated scenario names (default: by mode)."),
]
BackendOption = Annotated[
    str,
    typer.Option(
        metavar="NAME", help="torch: transformers on CUDA (or CPU); mlx: mlx-lm on Metal (or MLX's CPU)."
    ),
]


@bench_app.command()
def e2e(
    model: ModelOption = "qwen3-0.6b",
    mode: ModeOption = "quick",
    runs: RunsOption = None,
    warmup: WarmupOption = 1,
    all_scenarios: AllScenariosOption = False,
    out: OutOption = None,
    stem: E2eStemOption = None,
    time_budget: TimeBudgetOption = None,
    kernels: KernelPolicyOption = "measured",
    cache: CacheOption = "dynamic",
    interleave: InterleaveOption = "runs",
    prompt_tokens: PromptTokensOption = None,
    scenario_names: ScenariosOption = None,
    backend: BackendOption = "torch",
) -> None:
    """End-to-end generation scenarios: TTFT, prefill/decode tok/s, total time, peak memory."""
    from attnforge.bench import e2e as scenarios

    if mode not in scenarios.MODES:
        raise typer.BadParameter(f"mode={mode!r} is not one of {scenarios.MODES}", param_hint="--mode")
    if backend not in BACKENDS:
        raise typer.BadParameter(f"backend={backend!r} is not one of {BACKENDS}", param_hint="--backend")
    names = scenario_names.split(",") if scenario_names else None
    options = dict(mode=mode, runs=runs, warmup=warmup, all_scenarios=all_scenarios, kernels=kernels,
                   time_budget_s=time_budget)  # fmt: skip
    if backend == "mlx":
        if interleave != "runs":
            raise typer.BadParameter("mlx runs take turns by whole runs only", param_hint="--interleave")
        _e2e_mlx(model, options, out, stem)
        return
    require_model(model)
    _use_interpreter_without_gpu()
    target, stem = out or device_results_dir(), stem or _e2e_stem(model)
    options.update(cache=cache, interleave=interleave, names=names, prompt_tokens=prompt_tokens)
    doc = _run_e2e(model, options, checkpoint=lambda partial: report.save(partial, target, stem))
    if doc.get("note"):
        console.print(f"[yellow]{escape(doc['note'])}")
    print_e2e(doc)
    _save(doc, target, stem)
    if doc.get("failure"):
        console.print(f"[red]{escape(doc['failure'])}")
        raise typer.Exit(1)


def _run_e2e(model: str, options: dict, checkpoint) -> dict:
    """bench/e2e.run under a progress bar whose total is the number of scenarios that will run."""
    from attnforge.bench import e2e as scenarios

    total, why_fewer = scenarios.planned_scenarios(
        options["mode"], all_scenarios=options["all_scenarios"], names=options["names"],
        on_gpu=torch.cuda.is_available(),
    )  # fmt: skip
    if why_fewer:
        console.print(f"[yellow]{escape(why_fewer)}.")
    with _progress() as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        task = progress.add_task(f"e2e {model} {options['mode']}", total=total, row="")

        def advance(label: str, count: int) -> None:
            progress.update(task, total=count, advance=1, row=label)

        try:
            return scenarios.run(model, progress=advance, checkpoint=checkpoint, **options)
        except ValueError as error:
            console.print(f"[red]{escape(str(error))}")
            raise typer.Exit(1) from None


def print_e2e(doc: dict) -> None:
    """The end-to-end result as terminal tables (the Markdown goes to the result file)."""
    from rich.table import Table

    title = f"e2e {doc.get('model')} ({doc.get('mode')}, {doc.get('cache')} cache)"
    if "tokens_match" in doc:
        verdict = "identical" if doc["tokens_match"] else "[red]DIFFERENT"
        console.print(f"{escape(title)}: greedy tokens of plain transformers and attnforge: {verdict}")
    else:
        table = Table(title=title + ": median [95% interval]")
        for column in ("scenario", "side", "TTFT ms", "decode tok/s", "median token tok/s", "total s"):
            table.add_column(column, overflow="fold")
        for row in report.e2e_table_rows(doc):
            table.add_row(str(row[0]), row[3], row[4], row[6], row[7], row[8])
        console.print(table)
    improvements = report.e2e_improvement_rows(doc)
    if improvements:
        table = Table(title="attnforge / baseline (> 1: attnforge better)")
        for column in ("scenario", "TTFT", "prefill", "decode", "median token", "total", "paired step"):
            table.add_column(column, overflow="fold")
        for row in improvements:
            table.add_row(*row)
        console.print(table)
    for skipped in doc.get("skipped", []):
        console.print(f"skipped {escape(skipped['name'])}: {escape(skipped['reason'])}")


@bench_app.command()
def overhead(
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Also write the result (JSON) here.")
    ] = None,
) -> None:
    """Host cost per attention call that attnforge routes to torch (CPU micro-benchmark)."""
    from attnforge.bench import performance
    from attnforge.bench.overhead import fallback_overhead

    doc = {**fallback_overhead(), "environment": report.run_environment()}  # versions and commit
    for label, suffix in (("hot loop", "us"), ("caches swept between calls", "cold_us")):
        console.print(f"{label}: {escape(performance.overhead_sentence(doc, suffix))}")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = report.write_json(doc, Path(out) / f"{report.default_stem('overhead')}.json")
        console.print(f"wrote {path}")


def _e2e_stem(model: str) -> str:
    return report.default_stem("e2e", model.replace("/", "-"))


def _e2e_mlx(model: str, options: dict, out: Path | None, stem: str | None) -> None:
    """`bench e2e --backend mlx`: the same scenarios through mlx-lm (bench/mlx_e2e.py)."""
    try:
        from attnforge.bench import mlx_e2e
    except ImportError as error:
        console.print(f"[red]{escape(str(error))}")
        raise typer.Exit(1) from None
    if not mlx_e2e.on_metal():
        console.print(f"[yellow]{mlx_e2e.NO_METAL_NOTE}.")
    with _progress() as progress:
        task = progress.add_task(f"e2e mlx {model} {options['mode']}", total=None, row="")

        def advance(label: str, total: int) -> None:
            progress.update(task, total=total, advance=1, row=label)

        try:
            doc = mlx_e2e.run(model, progress=advance, **options)
        except ValueError as error:
            console.print(f"[red]{escape(str(error))}")
            raise typer.Exit(1) from None
    console.print(Markdown(mlx_e2e.markdown(doc)))  # rendered, not raw Markdown
    paths = mlx_e2e.save(
        doc, out or mlx_e2e.results_dir(results_root()), stem or report.default_stem("e2e-mlx", model)
    )
    console.print("wrote " + ", ".join(str(p) for p in paths))
    if doc.get("failure"):
        console.print(f"[red]{escape(doc['failure'])}")
        raise typer.Exit(1)


def _print_report_files(files: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title="result files in the report")
    table.add_column("file", overflow="fold")
    table.add_column("kind", overflow="fold")
    for name, kind in files:
        table.add_row(escape(name), escape(kind))
    console.print(table)


@bench_app.command("report")
def report_command(
    results: Annotated[
        Path, typer.Option(metavar="DIR", help="Directory of committed result files (<gpu>/*.json).")
    ] = RESULTS_DIR,
    out: Annotated[Path, typer.Option(metavar="FILE", help="Markdown file to (re)write.")] = Path(
        "docs/performance.md"
    ),
    readme: Annotated[
        Path, typer.Option(metavar="FILE", help="README whose results markers are refreshed.")
    ] = Path("README.md"),
) -> None:
    """Regenerate docs/performance.md, the README's results section and each result's own Markdown table
    from the JSON result files."""
    from attnforge.bench import performance

    try:
        section = performance.performance_markdown(results)
    except ValueError as error:
        console.print(f"[red]{escape(str(error))}")
        raise typer.Exit(1) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(section)
    _print_report_files(performance.file_kinds(results))
    console.print(f"wrote {out}", soft_wrap=True)
    for path in performance.regenerate_file_tables(results):
        console.print(f"rewrote {path}", soft_wrap=True)
    if performance.update_readme(readme, performance.readme_markdown(results)):
        console.print(f"updated the results section of {readme}", soft_wrap=True)
    else:
        console.print(
            f"{readme}: no '{report.README_START}' ... '{report.README_END}' markers; left unchanged",
            soft_wrap=True,
            markup=False,
        )
