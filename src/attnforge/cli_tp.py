"""`attnforge generate --tp N`: greedy generation tensor-parallel over N ranks (transformers' TP + attnforge).

Run by hand, it checks the request (N, the model's head counts, the GPUs here) and relaunches itself through
torch.distributed.run with N ranks; each rank then loads its shards (`integrations.tensor_parallel`) and runs
transformers' `generate`; rank 0 prints the tokens, the timing and what attnforge's attention did per rank.
The accelerator is single-GPU: with --tp, generation is transformers' own loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

from attnforge import models
from attnforge.cli_accel import GPU_DEFAULT
from attnforge.integrations import tensor_parallel as tp

console = Console(highlight=False)
# generate's options that --tp does not take, with their defaults
UNSUPPORTED = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop=None,
                   chat=None, compare=False, max_kv_size=None, keep=None, tune=False)  # fmt: skip
# --attention value -> (attn_implementation, kernels forced)
ATTENTION = {"auto": ("attnforge", False), "kernels": ("attnforge", True), "torch": ("sdpa", False)}


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(2)


def refuse_options(**values) -> None:
    """Exit (status 2) naming generate's options that --tp does not take, where `values` differ from the
    defaults (`UNSUPPORTED`)."""
    given = [name for name, value in values.items() if value != UNSUPPORTED[name]]
    if given:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
        raise _fail(f"--tp runs greedy transformers generate; not supported with --tp: {names}")


def generate_tp(tp_size: int, *, model: str | None, prompt: str, max_new_tokens: int,
                prompt_tokens: int | None, attention: str, out: Path | None = None) -> None:  # fmt: skip
    """Inside torchrun: this rank's part. Otherwise: check, then launch `tp_size` ranks and wait for them."""
    name = model or GPU_DEFAULT
    if attention not in ATTENTION:
        raise _fail(f"--attention {attention!r}: with --tp one of {sorted(ATTENTION)}")
    if tp.inside_torchrun():
        _run_rank(tp_size, name, prompt, max_new_tokens, prompt_tokens, attention, out)
        return
    check_request(tp_size, name)
    args = ["attnforge.cli", "generate", "--tp", str(tp_size), "--model", name, "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), "--attention", attention]  # fmt: skip
    if prompt_tokens is not None:
        args += ["--prompt-tokens", str(prompt_tokens)]
    if out is not None:
        args += ["--out", str(out)]
    status = tp.launch(tp_size, args)
    if status:
        raise _fail(f"the {tp_size} ranks exited with status {status} (their output is above)")


def check_request(tp_size: int, name: str) -> None:
    """Exit (status 2, one line) before launching: bad N, N not dividing the heads, N above the GPU count."""
    try:
        config = models.load_config(name)
    except (models.ModelNotFoundError, OSError, ValueError) as error:
        raise _fail(str(error)) from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    try:
        tp.check_tp_size(tp_size, config, gpus=gpus)
    except ValueError as error:
        raise _fail(f"{error} ({name})") from None


def _run_rank(tp_size: int, name: str, prompt: str, max_new_tokens: int, prompt_tokens, attention: str, out):
    import attnforge as af
    from attnforge.bench.e2e import prompt_token_ids
    from attnforge.optimizer import get_optimizer

    rank = tp.init_distributed()
    if rank.world != tp_size:
        raise _fail(f"--tp {tp_size} but torchrun started {rank.world} ranks")
    implementation, forced = ATTENTION[attention]
    if forced:
        af.configure_optimizer(require_measurement=False)
    dtype = torch.bfloat16 if rank.device.type == "cuda" else torch.float32
    path, temporary = tp.shared_checkpoint(name, rank, dtype=dtype)
    model = tp.load_tensor_parallel(path, dtype=dtype, attn_implementation=implementation)
    if temporary:
        tp.remove_checkpoint(path, rank)
    tokenizer = _tokenizer(name) if prompt_tokens is None else None
    if tokenizer is not None:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(rank.device)
    else:
        length = prompt_tokens or max(1, len(prompt.split()))
        ids = torch.tensor([prompt_token_ids(prompt, length, model.config.vocab_size)], device=rank.device)
    run = tp.timed_decode(model, ids, max_new_tokens, rank.device)
    ranks = [None] * rank.world
    torch.distributed.all_gather_object(ranks, {"stats": get_optimizer().get_stats(), **run.summary()})
    if rank.rank == 0:
        stats = [entry["stats"] for entry in ranks]
        _report(name, rank, model, implementation, run, stats)
        if tokenizer is not None:
            console.print(escape(tokenizer.decode(run.tokens)))
        if out is not None:
            path = _write_result(out, name, rank, implementation, ids.shape[1], ranks)
            console.print(f"wrote {escape(str(path))}")
    torch.distributed.destroy_process_group()


def _write_result(out: Path, name: str, rank: tp.Rank, implementation: str, prompt: int, ranks: list) -> Path:
    """`<out>/tp-<model>-tp<N>-<attention>-<YYYYMMDD>.json`: where it ran and every rank's timing and
    attnforge statistics (rank 0's numbers are the ones printed)."""
    from attnforge.bench.report import write_json
    from attnforge.environment import environment_report

    out.mkdir(parents=True, exist_ok=True)
    stem = f"tp-{Path(name).name}-tp{rank.world}-{implementation}-{time.strftime('%Y%m%d')}"
    doc = {"what": "tensor-parallel decode (transformers generate, greedy, batch 1)",
           "model": name, "random_weights": models.is_bundled(name), "tp": rank.world,
           "backend": rank.backend, "attn_implementation": implementation, "prompt_tokens": prompt,
           "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "environment": environment_report(),
           "ranks": ranks}  # fmt: skip
    return write_json(doc, out / f"{stem}.json")


def _tokenizer(name: str):
    """The checkpoint's tokenizer, or None (a bundled architecture, or a directory without one): the prompt
    is then bench/e2e's hashed words."""
    if models.is_bundled(name):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=models.model_source(name) != "hub")
    except (OSError, ValueError):
        return None


def _report(name: str, rank: tp.Rank, model, implementation: str, run: tp.DecodeRun, stats: list) -> None:
    source = "random weights" if models.is_bundled(name) else "weights from the checkpoint"
    console.print(f"[bold]model:[/bold] {escape(name)} ({source}), {model.dtype}, tensor-parallel over "
                  f"{rank.world} ranks ({rank.backend}), attn_implementation={implementation}")  # fmt: skip
    console.print(f"tokens: {run.tokens[:48]}{' ...' if len(run.tokens) > 48 else ''}")
    device = torch.cuda.get_device_name(rank.device) if rank.device.type == "cuda" else "cpu"
    console.print(escape(run.line(rank.world, device)))
    for index, entry in enumerate(stats):
        kernels = ", ".join(f"{kind} {count}" for kind, count in entry["by_kernel"].items()) or "none"
        console.print(f"rank {index}: attnforge attention calls {entry['calls']}, kernels: {kernels}, "
                      f"torch: {entry['fallbacks']}")  # fmt: skip
