"""`attnforge evolve tune | openevolve | evaluate` (mounted by attnforge/cli.py)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnforge.models import bundled_models

evolve_app = typer.Typer(
    help="Evolutionary kernel search with an evaluator that cannot be fooled.", no_args_is_help=True
)
console = Console()
KERNELS = ("decode", "prefill")
SUBSETS = ("quick", "full")


def _interpreter_without_gpu() -> None:
    """Without a GPU, Triton kernels run only under the interpreter (set before any kernel is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _choice(option: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise typer.BadParameter(f"{option} {value!r} is not one of {', '.join(accepted)}")
    return value


def _default_out() -> Path:
    from attnforge.kernels import tuning

    return tuning.user_table_path().parent / "evolve" / tuning.gpu_key()


# ----------------------------------------------------------------------------------------------------------
# tune


MODEL_HELP = f"bundled architecture ({', '.join(bundled_models())}) or local path"


DevicesOption = Annotated[
    str,
    typer.Option(
        metavar="SPEC",
        help="where candidates are evaluated, one pinned worker process per device: auto (every GPU if "
        "2 or more, else this process), cuda, cuda:0,1 or, without a GPU, cpu:N; over a Ray cluster "
        "(RAY_ADDRESS, else one started here): ray (an actor per GPU) or ray:N (N CPU actors)",
    ),
]


def _say_where_it_evaluates(devices: list[str]) -> None:
    if devices and devices[0].startswith("ray"):
        console.print(f"evaluating on Ray actors ({devices[0]}: one a GPU of the cluster, or N CPU ones)")
    elif devices:
        console.print(f"evaluating on {len(devices)} pinned worker processes: {', '.join(devices)}")


@evolve_app.command()
def tune(
    kernel: Annotated[str, typer.Option(metavar="KIND", help="decode or prefill")] = "decode",
    model: Annotated[str | None, typer.Option(metavar="NAME", help=MODEL_HELP)] = None,
    shapes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST", help="comma-separated BxHqxHkvxLqxLkvxD, each optionally @VALID (valid keys)"
        ),
    ] = None,
    budget: Annotated[int, typer.Option(min=1, metavar="N", help="evaluations per target")] = 24,
    population: Annotated[int, typer.Option(min=2, metavar="N", help="genomes per generation")] = 8,
    elite: Annotated[int, typer.Option(min=0, metavar="N", help="genomes kept unchanged")] = 2,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of the search")] = 0,
    batch: Annotated[int, typer.Option(min=1, metavar="B", help="batch size of the model's calls")] = 1,
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="bfloat16, float16 or float32")] = "bfloat16",
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="results and checkpoints (resumed when present)")
    ] = None,
    table: Annotated[
        Path | None, typer.Option(metavar="PATH", help="tuning table to write (default: yours)")
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="start no generation after this many seconds")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, metavar="N", help="processes compiling each generation (GPU only)")
    ] = 8,
    devices: DevicesOption = "auto",
) -> None:
    """Evolve the launch parameters of attnforge's kernel for the buckets a model (or given shapes) hits on
    this GPU; every candidate scored by the evaluator; the winners written to the tuning store."""
    from attnforge.bench import report
    from attnforge.bench.providers import DTYPES
    from attnforge.evolve import tuner

    _choice("--kernel", kernel, KERNELS)
    _choice("--dtype", dtype, tuple(DTYPES))
    settings, evaluation_devices = _search_settings(population, budget, elite, seed, devices)
    targets = _targets(kernel, model, shapes, batch, dtype)
    _interpreter_without_gpu()  # before the workers start: they inherit it
    if not torch.cuda.is_available():
        console.print(
            "[yellow]No CUDA GPU: fitness is correctness only (Triton interpreter); nothing is stored."
        )
    out = out or _default_out()
    stem = report.default_stem(f"evolve-tuning-{kernel}", model or "shapes")
    options = dict(out_dir=out, time_budget_s=time_budget, workers=workers, stem=stem,
                   devices=evaluation_devices)  # fmt: skip
    _say_where_it_evaluates(evaluation_devices)
    doc = _evolve_with_progress(f"evolve tune {kernel}", targets, settings, options)
    console.print(_tune_table(doc))
    console.print("wrote " + ", ".join(str(p) for p in tuner.save(doc, out, stem)))
    where = tuner.store(doc, table) if torch.cuda.is_available() else None
    if where:
        console.print(f"stored the entries in {where}")


def _search_settings(population: int, budget: int, elite: int, seed: int, devices: str) -> tuple:
    """(tuner.Settings, evaluation devices) from the options; BadParameter naming a bad value."""
    from attnforge.evolve import tuner
    from attnforge.evolve.pool import parse_devices

    try:
        settings = tuner.Settings(population=population, budget=budget, elite=elite, seed=seed)
        return settings, parse_devices(devices, torch.cuda.device_count())
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _evolve_with_progress(title: str, targets: list, settings, options: dict) -> dict:
    """evolve/tuner.run under a progress bar: one step per evaluation, the latest genome and its score."""
    from attnforge.bench import tune as bench_tune
    from attnforge.evolve import tuner

    with _progress() as bar:
        task = bar.add_task(title, total=settings.budget * len(targets), row="")

        def progress(event: dict) -> None:
            label = f"{event['target']}: {bench_tune.params_name(event['genome'])} -> {event['score']:.3f}"
            bar.update(task, advance=1, row=escape(label))

        return tuner.run(targets, settings, progress=progress, **options)


def _targets(kernel: str, model: str | None, shapes: str | None, batch: int, dtype: str) -> list:
    """The targets of `--model` (the buckets its generation hits) or of `--shapes`."""
    from attnforge.bench import targets
    from attnforge.evolve import tuner

    if (model is None) == (shapes is None):
        raise typer.BadParameter("give exactly one of --model NAME or --shapes LIST")
    try:
        if shapes is not None:
            return [tuner.shape_target(kernel, s.strip(), dtype) for s in shapes.split(",") if s.strip()]
        return targets.model_targets(model, batch=batch, kinds=(kernel,), dtype=dtype)
    except (ValueError, KeyError, OSError) as error:
        raise typer.BadParameter(str(error)) from None


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[row]}"), console=console)  # fmt: skip


def _tune_table(doc: dict) -> Table:
    from attnforge.bench.tune import params_name

    table = Table(title="attnforge evolve tune: best configuration per bucket")
    for column in ("bucket", "heuristic", "score", "best found", "score", "entry", "evaluations", "search s"):
        table.add_column(column)
    for row in doc["rows"]:
        entry = "-" if row.get("speedup") is None else f"{row['best']} {row['speedup']:.3f}x"
        base = "-" if row["heuristic_score"] is None else f"{row['heuristic_score']:.3f}"
        heuristic, best = params_name(row["heuristic_params"]), params_name(row["best_params"])
        score, searched = f"{row['best_score']:.3f}", f"{row['search_s']:.0f}"
        table.add_row(row["bucket"], heuristic, base, best, score, entry, str(row["evaluations"]), searched)
    return table


# ----------------------------------------------------------------------------------------------------------
# openevolve


@evolve_app.command()
def openevolve(
    task: Annotated[str, typer.Option("--task", metavar="KIND", help="decode or prefill")] = "decode",
    out: Annotated[Path, typer.Option(metavar="DIR", help="the task directory to write")] = Path(
        "evolve-task"
    ),
    api_base: Annotated[
        str, typer.Option(metavar="URL", help="OpenAI-compatible endpoint")
    ] = "https://api.openai.com/v1",
    model: Annotated[str, typer.Option(metavar="M", help="the endpoint's model name")] = "gpt-4o-mini",
    api_key_env: Annotated[
        str, typer.Option(metavar="VAR", help="environment variable holding the API key")
    ] = "OPENAI_API_KEY",
    iterations: Annotated[int, typer.Option(min=1, metavar="N", help="OpenEvolve iterations")] = 50,
    islands: Annotated[int, typer.Option(min=1, metavar="N", help="OpenEvolve islands")] = 2,
    seed: Annotated[int, typer.Option(metavar="N", help="OpenEvolve's random seed")] = 42,
    timing: Annotated[
        str, typer.Option(metavar="MODE", help="auto, cuda, interpreter (CPU test of the loop) or none")
    ] = "auto",
    run: Annotated[bool, typer.Option("--run", help="run OpenEvolve on the task (child process)")] = False,
    run_timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="stop an OpenEvolve run after this long")
    ] = None,
) -> None:
    """Write an OpenEvolve task directory for attnforge's kernel (initial program, evaluator, config) and,
    with --run, run it and report what it kept."""
    from attnforge.evolve import openevolve_task
    from attnforge.evolve.tasks import TIMING_MODES, default_task

    _choice("--task", task, KERNELS)
    _choice("--timing", timing, TIMING_MODES)
    try:
        written = openevolve_task.write_task(
            task, out, default_task(task, timing=timing), api_base=api_base, model=model,
            api_key_env=api_key_env, iterations=iterations, seed=seed, islands=islands,
        )  # fmt: skip
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console.print(f"wrote the OpenEvolve task to {written}")
    if not run:
        console.print(f"run it: attnforge evolve openevolve --task {task} --out {out} ... --run")
        return
    if importlib.util.find_spec("openevolve") is None:
        console.print("[red]" + escape("openevolve is not installed: pip install 'attnforge[evolve]'"))
        raise typer.Exit(2)
    _interpreter_without_gpu()
    summary = openevolve_task.run_task(written, iterations=iterations, timeout_s=run_timeout,
                                       api_key_env=api_key_env)  # fmt: skip
    (written / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "programs"}))
    console.print(_programs_table(summary))
    children = [p for p in summary["programs"] if p["iteration"] > 0]
    if summary.get("error") or not children:
        why = (
            summary.get("error")
            or "no program beyond the initial one (every LLM call failed or no diff applied)"
        )
        console.print(f"[red]OpenEvolve: {escape(why)}; {summary['llm_failures']} failed LLM calls")
        raise typer.Exit(1)
    console.print(f"best score {summary.get('best_score')} (initial {summary['initial_score']}); "
                  f"best program: {summary['best_program']}")  # fmt: skip


def _programs_table(summary: dict) -> Table:
    table = Table(title="OpenEvolve programs (score 0: rejected by the evaluator)")
    for column in ("iteration", "score", "reason"):
        table.add_column(column)
    for program in summary["programs"]:
        table.add_row(str(program["iteration"]), f"{program['score']:.3f}", escape(program["reason"][:160]))
    return table


# ----------------------------------------------------------------------------------------------------------
# evaluate


@evolve_app.command()
def evaluate(
    program: Annotated[Path, typer.Argument(metavar="PROGRAM", help="a candidate program (Python file)")],
    kernel: Annotated[str, typer.Option(metavar="KIND", help="decode or prefill")] = "decode",
    subset: Annotated[str, typer.Option(metavar="SUBSET", help="quick or full")] = "quick",
    prompt: Annotated[str, typer.Option(metavar="TEXT", help="prompt, where the model has a tokenizer")] = (
        "What is the capital of France?"
    ),
    model: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="model for the generation (default: SmolLM2 on CPU if "
            "readable, else a reduced qwen3-0.6b; qwen3-0.6b on a GPU)",
        ),
    ] = None,
    new_tokens: Annotated[int, typer.Option(min=1, metavar="N", help="tokens to generate")] = 8,
    generate: Annotated[
        bool, typer.Option("--generate/--no-generate", help="also run a real generation")
    ] = True,
    out: Annotated[Path | None, typer.Option(metavar="FILE", help="write the verdict as JSON")] = None,
) -> None:
    """Judge a program on the benchmark subset (correctness, then timing on a GPU), then generate with a real
    model using it for decode (only once it passed) and compare with torch."""
    from attnforge.evolve import evaluator
    from attnforge.evolve.tasks import default_task, full_task

    _choice("--kernel", kernel, KERNELS)
    _choice("--subset", subset, SUBSETS)
    if not program.is_file():
        raise typer.BadParameter(f"PROGRAM {str(program)!r} is not a file")
    _interpreter_without_gpu()
    task = default_task(kernel) if subset == "quick" else full_task(kernel)
    result = evaluator.evaluate(program, task)
    console.print(_verdict_table(result))
    from attnforge.bench.report import run_environment

    verdict = {"what": "evolve-evaluate", "program": str(program), "subset": subset, "task": task.to_dict(),
               "environment": run_environment(), "metrics": result.metrics,
               "artifacts": result.artifacts}  # fmt: skip
    passed = result.score > 0
    if passed and generate and kernel == "decode":
        from attnforge.evolve.generation import generation_check

        verdict["generation"] = generation_check(program, model, prompt, new_tokens, console)
        passed = verdict["generation"]["passed"]
    elif generate and kernel == "prefill":
        console.print("[yellow]generation: only decode programs run inside a model")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(verdict, indent=1, default=str) + "\n")
        console.print(f"wrote {out}")
    if not passed:
        raise typer.Exit(1)


def _verdict_table(result) -> Table:
    table = Table(title=f"evaluator verdict: combined_score {result.score:.4f}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    for name in ("reason", "timing", "speedups", "failures", "compile_error"):
        if result.artifacts.get(name):
            table.add_row(name, escape(str(result.artifacts[name])[:1500]))
    return table
