"""`attnforge <command>`: info, demo, generate, chat, tune, bench ..."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from attnforge import cli_accel, cli_quant, verify
from attnforge.bench import report
from attnforge.bench.cli import bench_app, model_help, require_model
from attnforge.config import MAX_DECODE_QUERY_LEN, AttentionConfig
from attnforge.environment import environment_report, triton_interpret
from attnforge.evolve.cli import evolve_app
from attnforge.kernels import available_kernels


def _with_metavars(params: list) -> list:
    """Help shows a real metavar: none after a flag (typer prints `<bool>`), the option's name otherwise."""
    for param in params:
        if isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag else (param.name or "value").upper()
    return params


def _fix_help(command, ctx) -> None:
    _with_metavars(command.get_params(ctx))
    for sub in getattr(command, "commands", {}).values():
        _fix_help(sub, ctx)


class HelpGroup(TyperGroup):
    """The root command group: every subcommand's `--help` shows real metavars (see `_with_metavars`)."""

    def get_params(self, ctx) -> list:
        return _with_metavars(super().get_params(ctx))

    def get_command(self, ctx, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _fix_help(command, ctx)
        return command


app = typer.Typer(
    cls=HelpGroup, help="attnforge: verified attention kernels for LLM inference.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
app.command()(cli_accel.generate)
app.command()(cli_accel.chat)
bench_app.command("accel")(cli_accel.bench_accel)
app.command()(cli_quant.convert)
bench_app.command("quant")(cli_quant.bench_quant)
bench_app.command("quant-speed")(cli_quant.bench_quant_speed)
app.add_typer(evolve_app, name="evolve")
console = Console()


def _info_table(report: dict) -> Table:
    table = Table(title="attnforge environment", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key in ("attnforge", "python", "torch", "triton", "transformers", "platform", "device"):
        table.add_row(key, str(report.get(key)))
    if report["device"] == "cuda":
        for key in ("gpu", "sm_count", "memory_gib", "compute_capability", "cuda", "driver"):
            table.add_row(key, str(report.get(key)))
    else:
        table.add_row("gpu", "none (CPU only)")
    table.add_row(
        "triton kernels", f"{'yes' if report['triton_kernels'] else 'no'}: {report['triton_reason']}"
    )
    sdpa = ", ".join(name for name, ok in report["sdpa_backends"].items() if ok)
    table.add_row("torch SDPA backends", sdpa)
    table.add_row("attnforge kernels", _kernels_row())
    return table


def _kernels_row() -> str:
    """Which attnforge kernels run here and how: the same answer the demo then acts on."""
    names = ", ".join(available_kernels())
    if names:
        return names + (" (Triton interpreter on CPU: correctness only, slow)" if triton_interpret() else "")
    names = ", ".join(available_kernels(interpreter=True))
    if names:
        return (
            f"{names} through the Triton interpreter only: set TRITON_INTERPRET=1 (correctness only, slow; "
            "`attnforge demo` and the tests set it)"
        )
    return "none"


@app.command()
def info() -> None:
    """Versions, device, GPU, and which kernels and backends can run here."""
    console.print(_info_table(environment_report()))


def _demo_shapes(on_gpu: bool, dtype: torch.dtype) -> list[AttentionConfig]:
    """Causal throughout: with one query token it is the same attention, and decode kernels are causal."""
    # (B, Hq, Hkv, Lq, Lkv, D)
    gpu_sizes, cpu_sizes = (
        [(2, 32, 8, 1, 4097, 128), (1, 16, 2, 65, 1000, 64)],
        [(2, 4, 2, 1, 65, 64), (1, 6, 1, 7, 63, 64)],
    )
    sizes = gpu_sizes if on_gpu else cpu_sizes
    return [AttentionConfig.from_sizes(*size, dtype=dtype, causal=True) for size in sizes]


def _verification_table(candidates: dict, shapes: list[AttentionConfig], device: str) -> tuple[Table, int]:
    table = Table(title=f"correctness protocol ({device}, {str(shapes[0].dtype)[6:]}; oracle: float64)")
    for column in ("implementation", "shape", "cases passed", "worst rel L2", "failures"):
        table.add_column(column)
    failures = 0
    for name, fn in candidates.items():
        for shape in shapes:
            if "decode" in name and shape.seq_len > MAX_DECODE_QUERY_LEN:
                table.add_row(
                    name, f"Lq={shape.seq_len}", "n/a", "", f"decode takes Lq <= {MAX_DECODE_QUERY_LEN}"
                )
                continue
            cases = verify.protocol_cases(shape, device=device)
            reports = verify.check_all(fn, cases)
            failed = [
                f"{case.name}: {r.reason}" for case, r in zip(cases, reports, strict=True) if not r.passed
            ]
            failures += len(failed)
            worst = max(r.max_rel_l2 for r in reports)
            passed = f"{len(reports) - len(failed)}/{len(reports)}"
            style = "[green]" if not failed else "[red]"
            table.add_row(
                name, cases[0].describe().split(" ", 1)[1], style + passed, f"{worst:.1e}", "; ".join(failed)
            )
    return table, failures


def _planted_bugs_table(shape: AttentionConfig, device: str) -> Table:
    """Each planted wrong kernel against the protocol's cases: which cases reject it, and why."""
    table = Table(title="planted wrong kernels (each must be rejected)")
    for column in ("planted bug", "rejected by", "first reason"):
        table.add_column(column)
    for name, fn in verify.PLANTED_BUGS.items():
        cases = verify.protocol_cases(shape, device=device)
        failed = [(case.name, report) for case in cases if not (report := verify.check(fn, case)).passed]
        rejected = ", ".join(case for case, _ in failed) or "[red]NOTHING: protocol broken"
        table.add_row(name, rejected, failed[0][1].reason if failed else "")
    return table


def _runs_table(runs) -> Table:
    table = Table(title="generation, with and without attnforge (greedy, batch 1)")
    for column in ("run", "time (s)", "tok/s", "peak memory (GiB)", "speedup", "optimization rate"):
        table.add_column(column)
    base = runs[0]
    for run in runs:
        memory = "-" if run.peak_memory_gib is None else f"{run.peak_memory_gib:.2f}"
        rate = "-" if run.optimization_rate is None else f"{run.optimization_rate:.0%}"
        speedup = f"{base.seconds / run.seconds:.2f}x"
        table.add_row(run.name, f"{run.seconds:.2f}", f"{run.tokens_per_second:.1f}", memory, speedup, rate)
    return table


def _decisions_table(decisions: list[dict]) -> Table:
    table = Table(title="dispatch decisions (each distinct one, first occurrence)")
    for column in ("calls", "ran", "why"):
        table.add_column(column)
    for decision in decisions:
        table.add_row(str(decision["calls"]), decision["kernel"], decision["reason"])
    return table


def _model_demo(model_name: str, on_gpu: bool, prompt_len: int, new_tokens: int, cache: str) -> bool:
    """Build the model, then time (GPU) or check (CPU) attnforge against transformers. True if all good."""
    from attnforge import demo as model_demo
    from attnforge.integrations.transformers import family_support
    from attnforge.optimizer import get_optimizer

    model = model_demo.build_for_demo(model_name, on_gpu)
    console.print(f"[bold]model:[/bold] {model_demo.describe_model(model_name, model, on_gpu)}")
    supported, note = family_support(model)
    console.print(f"[bold]family {model.config.model_type}:[/bold] {note}")
    if not supported:
        return True
    if on_gpu:
        ids = model_demo.random_prompt(model.config.vocab_size, prompt_len, device="cuda")
        runs = model_demo.speed_comparison(model, ids, new_tokens, cache)
        console.print(_runs_table(runs))
        console.print(_decisions_table(get_optimizer().decisions()))
        same = model_demo.same_tokens(runs[0], runs[-1])
        console.print(
            f"same tokens as transformers: {'yes' if same else 'no (bf16 rounding can flip near-ties)'}"
        )
        return True
    ids = model_demo.random_prompt(model.config.vocab_size, prompt_len, batch=2)
    report = model_demo.correctness_check(model, ids, new_tokens)
    console.print(_decisions_table(report.decisions))
    verdict = "[green]PASS" if report.passed else "[red]FAIL"
    tokens = ", ".join(
        f"{name}: {'identical' if ok else 'DIFFERENT'}" for name, ok in report.tokens_equal.items()
    )
    stats = report.stats
    console.print(
        f"{verdict}[/] attnforge vs eager, fp32, prompt {prompt_len} x 2 sequences, {new_tokens} new tokens: "
        f"logits max relative error {report.logits_rel_error:.1e} (<= 1e-4); greedy tokens {tokens}; "
        f"{stats['optimized']}/{stats['calls']} attention calls ran attnforge kernels {stats['by_kernel']}"
    )
    return report.passed


@app.command()
def demo(
    model: str = typer.Option("qwen3-0.6b", "--model", metavar="NAME", help=model_help()),
    prompt_len: int = typer.Option(
        None, "--prompt-len", metavar="N", help="prompt tokens (default: 128 on GPU, 24 on CPU)"
    ),
    new_tokens: int = typer.Option(
        None, "--new-tokens", metavar="N", help="tokens to generate (default: 64 on GPU, 6 on CPU)"
    ),
    cache: str = typer.Option(
        "dynamic", "--cache", metavar="KIND", help="KV cache for the GPU timing: dynamic or static"
    ),
    protocol: bool = typer.Option(
        True, "--protocol/--no-protocol", help="run the kernel correctness protocol"
    ),
) -> None:
    """Environment, the correctness protocol, then a model generating with and without attnforge.

    On a GPU the generation is timed side by side; without one, the Triton kernels run in the interpreter
    on a reduced copy of the model and are checked against eager attention instead.
    """
    import os

    import torch

    if cache not in ("dynamic", "static"):
        raise typer.BadParameter(f"--cache {cache!r} is not one of: dynamic, static")
    require_model(model)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # before the report, so it shows the kernels as the demo runs them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    console.print(_info_table(environment_report()))
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    if not on_gpu:
        console.print(
            "[yellow]No GPU here: showing the dispatch decisions and correctness only; speed needs a CUDA "
            "GPU. The Triton kernels run through the interpreter (TRITON_INTERPRET=1)."
        )
    failures = 0
    if protocol:
        from attnforge.kernels import reference

        candidates = {"torch sdpa per sequence": reference.sdpa_per_sequence, **available_kernels()}
        shapes = _demo_shapes(on_gpu, dtype)
        table, failures = _verification_table(candidates, shapes, device)
        console.print(table)
        console.print(_planted_bugs_table(shapes[-1], device))
    prompt_len = prompt_len or (128 if on_gpu else 24)
    new_tokens = new_tokens or (64 if on_gpu else 6)
    model_ok = _model_demo(model, on_gpu, prompt_len, new_tokens, cache)
    if failures:
        console.print(f"[red]{failures} correctness failures")
    if failures or not model_ok:
        raise typer.Exit(1)


@app.command()
def tune(
    model: Annotated[str | None, typer.Option(metavar="NAME", help=model_help())] = None,
    preset: Annotated[
        str | None, typer.Option(metavar="NAME", help="a preset grid: decode-grid, decode-lens, prefill-grid")
    ] = None,
    kernels: Annotated[
        str, typer.Option(metavar="KINDS", help="with --model: decode,prefill")
    ] = "decode,prefill",
    batch: Annotated[int, typer.Option(min=1, metavar="B", help="batch size of the model's calls")] = 1,
    quick: Annotated[bool, typer.Option("--quick/--full", help="fewer candidates per bucket")] = True,
    table: Annotated[
        Path | None, typer.Option(metavar="PATH", help="table to write (default: yours)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="also write the measurements (JSON)")
    ] = None,
    graph_layers: Annotated[
        int, typer.Option(min=0, metavar="N", help="also time decode winners in a CUDA graph of N layers")
    ] = 0,
    graph_candidates: Annotated[
        int | None,
        typer.Option(min=0, metavar="N", help="with --graph-layers: plain runners-up also timed there (3)"),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="start no target after this many seconds")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="only the targets whose label contains TEXT (or a part of A,B)"),
    ] = None,
    from_results: Annotated[
        Path | None, typer.Option(metavar="FILE", help="store the entries of a saved tuning result (no GPU)")
    ] = None,
) -> None:
    """Measure attnforge's kernels against torch for the buckets a model (or a preset grid) hits on this GPU,
    correctness first, and store the winning launch parameters and speed-ups in your tuning table."""
    from attnforge.bench import tune as tuner

    if from_results is not None:
        doc = json.loads(from_results.read_text())
        console.print(f"wrote the entries of {from_results} to {tuner.store(doc, from_results.name, table)}")
        return
    targets = _only(_tune_targets(model, preset, kernels, batch), only)
    if not torch.cuda.is_available():
        console.print("[yellow]No CUDA GPU: correctness only (Triton interpreter); nothing is stored.")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    stem = report.default_stem("tuning", model or preset)

    def progress(index: int, label: str) -> None:
        console.print(f"{index + 1}/{len(targets)} {label}")

    def checkpoint(doc: dict) -> None:
        if out is not None:
            tuner.save(doc, out, stem)

    console.print(f"compiling the candidates of {len(targets)} targets (worker processes) ...")
    options = dict(quick=quick, graph_layers=graph_layers, graph_runners_up=graph_candidates,
                   time_budget_s=time_budget)  # fmt: skip
    doc = tuner.run(targets, progress=progress, checkpoint=checkpoint, **options)
    console.print(_tune_table(doc))
    if out is not None:
        console.print("wrote " + ", ".join(str(p) for p in tuner.save(doc, out, stem)))
    if torch.cuda.is_available():
        source = f"attnforge tune {model or preset} ({doc['created'][:10]})"
        console.print(f"stored the entries in {tuner.store(doc, source, table)}")


def _only(targets: list, text: str | None) -> list:
    """The targets whose label contains `text`, or one of its comma-separated parts (all without it); none is
    refused, with what there is."""
    if text is None:
        return targets
    kept = [t for t in targets if any(part in t.label for part in text.split(","))]
    if not kept:
        labels = "; ".join(t.label for t in targets[:3])
        raise typer.BadParameter(f"--only {text!r} matches none of the {len(targets)} targets, e.g. {labels}")
    return kept


def _tune_targets(model, preset, kernels, batch) -> list:
    from attnforge.bench import targets

    if (model is None) == (preset is None):
        raise typer.BadParameter("give exactly one of --model NAME or --preset NAME")
    if preset is not None:
        if preset not in targets.PRESETS:
            raise typer.BadParameter(f"--preset {preset!r} is not one of {sorted(targets.PRESETS)}")
        return targets.PRESETS[preset]()
    kinds = tuple(k.strip() for k in kernels.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ("decode", "prefill")]
    if unknown or not kinds:
        raise typer.BadParameter(f"--kernels {kernels!r}: accepted kinds are decode, prefill")
    return targets.model_targets(model, batch=batch, kinds=kinds)


def _tune_table(doc: dict) -> Table:
    table = Table(title="attnforge tune: fastest correct configuration per bucket")
    for column in ("bucket", "best", "us", "torch us", "speed-up", "heuristic"):
        table.add_column(column)
    for row in doc["rows"]:
        if row.get("speedup") is None:
            wrong = [n for n, c in row["candidates"].items() if c["status"] != "correct"]
            table.add_row(row["bucket"], "-", "", "", "", f"not timed; failed: {', '.join(wrong) or 'none'}")
            continue
        heuristic = row.get("heuristic_speedup")
        table.add_row(row["bucket"], row["best"], f"{row['best_us']:.1f}", f"{row['torch_us']:.1f}",
                      f"{row['speedup']:.2f}x", f"{heuristic:.2f}x" if heuristic else "-")  # fmt: skip
    return table


if __name__ == "__main__":
    app()
