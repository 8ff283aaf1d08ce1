"""`attnforge convert`, `attnforge bench quant` (quality) and `bench quant-speed`: weight quantization
from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from attnforge.bench import accel_tables

console = Console(highlight=False)
ResultsOption = Annotated[
    Path | None, typer.Option(help="Result folder (default: the cache's results/<device> folder).")
]
SOURCE_HELP = "A local Hugging Face model folder, a bundled architecture (random weights), or smollm2 (real)."


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(2)


def convert(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    destination: Annotated[Path, typer.Argument(help="Folder to write the quantized checkpoint into.")],
    recipe: Annotated[
        str, typer.Option(help="speed-4bit, balanced-5bit, quality-8bit or mixed.")
    ] = "speed-4bit",
    group_size: Annotated[int, typer.Option(help="Input features per scale: 32, 64 or 128.")] = 64,
    predicate: Annotated[
        str | None, typer.Option(help="module:function(name, module) -> bool | bits, per linear layer.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Dtype of the unquantized parts and scales.")] = "float32",
) -> None:
    """Quantize a model and save it (safetensors + config.json with a quantization section + tokenizer);
    load it back with attnforge.load_quantized(DESTINATION)."""
    from attnforge.accel.quant import checkpoint
    from attnforge.accel.quant.linear import check_group_size
    from attnforge.accel.quant.recipes import check_recipe
    from attnforge.models import ModelNotFoundError

    if dtype not in ("float32", "bfloat16", "float16"):
        raise _fail(f"--dtype {dtype!r} is not supported; accepted: float32, bfloat16, float16")
    try:
        check_recipe(recipe)
        check_group_size(group_size)
        rule = checkpoint.load_predicate(predicate) if predicate else None
    except (ValueError, ImportError, AttributeError) as error:
        raise _fail(str(error)) from None
    try:
        report, what = checkpoint.convert(
            source,
            destination,
            recipe=recipe,
            group_size=group_size,
            predicate=rule,
            dtype=getattr(torch, dtype),
        )
    except (ValueError, ModelNotFoundError) as error:
        raise _fail(str(error)) from None
    console.print(f"[bold]model:[/bold] {escape(what)}")
    console.print(f"[bold]quantized:[/bold] {escape(report.summary())}")
    console.print(f"wrote {escape(str(destination))} (load it with attnforge.load_quantized)")


def bench_quant(
    model: Annotated[str, typer.Option(help="smollm2 (real weights) or a bundled architecture.")] = "smollm2",
    recipes: Annotated[str, typer.Option(help="Comma-separated recipes (default: all).")] = "",
    group_sizes: Annotated[
        str, typer.Option(help="Comma-separated group sizes, run in this order.")
    ] = "64,32,128",
    layers: Annotated[int | None, typer.Option(help="Random-weight architectures: keep N layers.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Random-weight architectures: vocabulary size.")] = None,
    tokens: Annotated[int, typer.Option(help="Random-weight architectures: random tokens to score.")] = 256,
    out: ResultsOption = None,
    stem: Annotated[
        str | None, typer.Option(help="File name stem (default quant-quality-<model>-DATE).")
    ] = None,
) -> None:
    """Perplexity on the shipped text, logit error and top-1 agreement against the unquantized model, and
    weight bytes, per recipe and group size (CPU, float32). Quality only, no speed."""
    from attnforge.accel.quant import quality
    from attnforge.bench.cli import device_results_dir
    from attnforge.bench.report import default_stem

    chosen, sizes = _recipes(recipes), _group_sizes(group_sizes)
    loaded, ids, what, name, text = _quality_inputs(model, layers, vocab, tokens)
    out, stem = out or device_results_dir(), stem or default_stem("quant-quality", name)

    def save(rows: list[dict], label: str) -> None:  # after every row: a long CPU run keeps what it has
        doc = quality.quality_document(name, what, rows, ids.shape[1], torch.float32, text)
        quality.write_quality(doc, out, stem)
        if label:
            console.print(f"[dim]{escape(label)}")

    try:
        rows = quality.quality_run(loaded, ids, recipes=chosen, group_sizes=sizes, on_row=save)
    except ValueError as error:
        raise _fail(str(error)) from None
    doc = quality.quality_document(name, what, rows, ids.shape[1], torch.float32, text)
    console.print(Markdown(accel_tables.quality_markdown(doc)))  # rendered, not raw Markdown
    console.print("wrote " + ", ".join(str(p) for p in quality.write_quality(doc, out, stem)))


def _recipes(text: str) -> list[str]:
    """The recipes named in a comma-separated option (all when empty); exit 2 on an unknown one."""
    from attnforge.accel.quant.recipes import RECIPES

    chosen = [r.strip() for r in text.split(",") if r.strip()] or list(RECIPES)
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise _fail(f"--recipes: unknown {unknown}; accepted: {', '.join(RECIPES)}")
    return chosen


def _group_sizes(text: str) -> list[int]:
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise _fail(f"--group-sizes {text!r} must be comma-separated integers") from None


def _quality_inputs(model: str, layers, vocab, tokens: int) -> tuple:
    """(model, token ids [1, T], what the weights are, result name, what the text is) for a quality run."""
    from attnforge import models
    from attnforge.accel.quant import quality

    if model in ("smollm2", models.SMOLLM2_NAME):
        loaded, tokenizer = models.load_smollm2(dtype=torch.float32, device="cpu")
        ids = tokenizer(quality.quality_text(), return_tensors="pt").input_ids
        return loaded, ids, "real weights", "smollm2", quality.TEXT_SOURCE
    overrides = {k: v for k, v in {"num_hidden_layers": layers, "vocab_size": vocab}.items() if v}
    loaded = models.build_model(model, dtype=torch.float32, device="cpu", **overrides)
    ids = torch.randint(0, loaded.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    what = f"random weights, random tokens, overrides {overrides or 'none'} (perplexity means nothing here)"
    return loaded, ids, what, model, f"{tokens} random token ids (seed 0)"


def bench_quant_speed(
    model: Annotated[str, typer.Option(help="A bundled architecture (random weights).")] = "llama3-8b",
    recipes: Annotated[str, typer.Option(help="Comma-separated recipes (default: all).")] = "",
    group_size: Annotated[int, typer.Option(help="Input features per scale: 32, 64 or 128.")] = 64,
    backend: Annotated[str, typer.Option(help="The quantized matmul backend (MATMUL_BACKENDS).")] = "auto",
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length in tokens.")] = 128,
    new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per timed generation.")] = 256,
    runs: Annotated[int, typer.Option(min=1, help="Timed generations per row (median).")] = 3,
    layers: Annotated[int | None, typer.Option(help="Keep N layers (smoke tests).")] = None,
    vocab: Annotated[int | None, typer.Option(help="Vocabulary size (smoke tests).")] = None,
    out: ResultsOption = None,
    stem: Annotated[
        str | None, typer.Option(help="File name stem (default quant-decode-<model>-DATE).")
    ] = None,
) -> None:
    """Decode tok/s with the accelerator, unquantized and per recipe (batch 1, random weights; on a GPU the
    read bandwidth is measured in the same run). Files are rewritten after every row."""
    from attnforge.accel.quant import speed
    from attnforge.accel.quant.linear import MATMUL_BACKENDS
    from attnforge.bench.cli import device_results_dir, require_model
    from attnforge.bench.report import default_stem

    require_model(model)
    if backend not in MATMUL_BACKENDS:
        raise _fail(f"--backend {backend!r} is not registered; accepted: {', '.join(MATMUL_BACKENDS)}")
    chosen = _recipes(recipes)
    settings = speed.SpeedSettings(group_size, backend, prompt_tokens, new_tokens, runs, 1, layers, vocab)
    out, stem = out or device_results_dir(), stem or default_stem("quant-decode", model)

    def save(doc: dict) -> None:
        speed.write(doc, out, stem)
        row = doc["rows"][-1]
        console.print(f"{escape(row['recipe'])}: {row['decode_tok_s']:.1f} tok/s ({row['ratio']:.2f}x)")

    try:
        doc = speed.run(model, chosen, settings, on_row=save)
    except ValueError as error:
        raise _fail(str(error)) from None
    console.print(Markdown(accel_tables.speed_markdown(doc)))
    if doc["note"]:
        console.print(f"[yellow]{escape(doc['note'])}")
