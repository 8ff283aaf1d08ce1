"""`attnforge <command>`: info, demo, ..."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from attnforge import verify
from attnforge.bench.cli import bench_app, require_model
from attnforge.config import MAX_DECODE_QUERY_LEN
from attnforge.environment import environment_report, triton_interpret
from attnforge.kernels import available_kernels

app = typer.Typer(help="attnforge: verified attention kernels for LLM inference.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
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


def _demo_shapes(on_gpu: bool) -> list[verify.Shape]:
    if on_gpu:
        return [verify.Shape(2, 32, 8, 1, 4097, 128), verify.Shape(1, 16, 2, 65, 1000, 64)]
    return [verify.Shape(2, 4, 2, 1, 65, 64), verify.Shape(1, 6, 1, 7, 63, 64)]


def _verification_table(
    candidates: dict, shapes: list[verify.Shape], device: str, dtype
) -> tuple[Table, int]:
    table = Table(title=f"correctness protocol ({device}, {str(dtype)[6:]}; oracle: float64)")
    for column in ("implementation", "shape", "cases passed", "worst rel L2", "failures"):
        table.add_column(column)
    failures = 0
    for name, fn in candidates.items():
        for shape in shapes:
            if "decode" in name and shape.q_len > MAX_DECODE_QUERY_LEN:
                table.add_row(
                    name, f"Lq={shape.q_len}", "n/a", "", f"decode takes Lq <= {MAX_DECODE_QUERY_LEN}"
                )
                continue
            # causal throughout: with one query token it is the same attention, and decode kernels are causal
            cases = verify.protocol_cases(shape, dtype=dtype, device=device, causal=True)
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


def _planted_bugs_table(shape: verify.Shape, device: str, dtype) -> Table:
    """Each planted wrong kernel against the protocol's cases: which cases reject it, and why."""
    table = Table(title="planted wrong kernels (each must be rejected)")
    for column in ("planted bug", "rejected by", "first reason"):
        table.add_column(column)
    for name, fn in verify.PLANTED_BUGS.items():
        cases = verify.protocol_cases(shape, dtype=dtype, device=device, causal=True)
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
    model: str = typer.Option(
        "qwen3-0.6b", "--model", help="bundled architecture (random weights) or a hub id / local path"
    ),
    prompt_len: int = typer.Option(
        None, "--prompt-len", help="prompt tokens (default: 128 on GPU, 24 on CPU)"
    ),
    new_tokens: int = typer.Option(
        None, "--new-tokens", help="tokens to generate (default: 64 on GPU, 6 on CPU)"
    ),
    cache: str = typer.Option("dynamic", "--cache", help="KV cache for the GPU timing: dynamic or static"),
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
        shapes = _demo_shapes(on_gpu)
        table, failures = _verification_table(candidates, shapes, device, dtype)
        console.print(table)
        console.print(_planted_bugs_table(shapes[-1], device, dtype))
    prompt_len = prompt_len or (128 if on_gpu else 24)
    new_tokens = new_tokens or (64 if on_gpu else 6)
    model_ok = _model_demo(model, on_gpu, prompt_len, new_tokens, cache)
    if failures:
        console.print(f"[red]{failures} correctness failures")
    if failures or not model_ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
