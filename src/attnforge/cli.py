"""`attnforge <command>`: info, demo, ..."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from attnforge import verify
from attnforge.environment import environment_report
from attnforge.kernels import available_kernels

app = typer.Typer(help="attnforge: verified attention kernels for LLM inference.", no_args_is_help=True)
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
    table.add_row("attnforge kernels", ", ".join(available_kernels()) or "none")
    return table


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
            cases = verify.protocol_cases(shape, dtype=dtype, device=device, causal=shape.q_len > 1)
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


@app.command()
def demo() -> None:
    """Environment, then the correctness protocol on attnforge's kernels and on planted wrong kernels."""
    import torch

    from attnforge.kernels import reference

    report = environment_report()
    console.print(_info_table(report))
    on_gpu = report["device"] == "cuda"
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    if not on_gpu:
        console.print("[yellow]No GPU here: showing correctness only; speed needs a CUDA GPU.")
    candidates = {"torch sdpa per sequence": reference.sdpa_per_sequence, **available_kernels()}
    shapes = _demo_shapes(on_gpu)
    table, failures = _verification_table(candidates, shapes, device, dtype)
    console.print(table)
    caught = _planted_bugs_table(shapes[-1], device, dtype)
    console.print(caught)
    if failures:
        console.print(f"[red]{failures} correctness failures")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
