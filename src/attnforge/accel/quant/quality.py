"""What quantization costs in quality: perplexity on a fixed text, logit error against the unquantized model.

`quality_run` quantizes fresh copies of one model with each recipe and group size and measures, for each:
perplexity on the shipped text (`data/mill-river.txt`, ~3 KB of plain English written for attnforge and
dedicated to the public domain, CC0), the logits' relative L2 error and top-1 agreement against the
unquantized model at every position of that text, and the bytes of the weights (`model_bytes`, which is the
size of the checkpoint's tensors). Quality only: no speed is measured here.
"""

from __future__ import annotations

import copy
import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from attnforge.accel.quant.recipes import RECIPES, model_bytes, quantize

TEXT_PATH = Path(__file__).with_name("data") / "mill-river.txt"
TEXT_SOURCE = "attnforge/accel/quant/data/mill-river.txt: written for attnforge, public domain (CC0)"


def quality_text() -> str:
    """The shipped English text (~3 KB)."""
    return TEXT_PATH.read_text()


@torch.no_grad()
def sequence_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits `[T, vocab]` (float32) of the model at every position of `ids` `[1, T]` (one forward)."""
    return model(ids).logits[0].float()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy): `logits` `[T, vocab]` predict `ids` `[1, T]` shifted by one."""
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:].to(logits.device))
    return float(torch.exp(loss))


def logit_error(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Against `reference` `[T, vocab]`: the relative L2 error `||logits - reference|| / ||reference||` over
    all positions, the fraction of positions whose argmax token agrees, and the mean KL divergence
    KL(reference || quantized) per position in nats (blind to a shift of all logits, which L2 is not)."""
    rel_l2 = float((logits - reference).norm() / reference.norm())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return {"rel_l2": rel_l2, "top1_agreement": agree, "kl": kl}


def quality_run(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    recipes=tuple(RECIPES),
    group_sizes=(64, 32, 128),
    on_row: Callable[[list[dict], str], None] | None = None,
) -> list[dict]:
    """One row per (group size, recipe), in that order, after a row for the unquantized model. `model` is not
    changed. `on_row(rows so far, label of the next row)` is called before each quantized row and at the end
    (label "") so a long run can save what it has.

    Args:
        model: an unquantized causal LM; ids: `[1, T]` token ids on the model's device.
    """
    reference = sequence_logits(model, ids)
    rows = [
        {"recipe": "unquantized", "group_size": None, "perplexity": perplexity(reference, ids), "rel_l2": 0.0,
         "top1_agreement": 1.0, "kl": 0.0, "weight_bytes": model_bytes(model), "quantize_s": 0.0}
    ]  # fmt: skip
    for group_size in group_sizes:
        for recipe in recipes:
            if on_row is not None:
                on_row(rows, f"{recipe}, group {group_size}")
            rows.append(_quality_row(model, ids, reference, recipe, group_size))
    if on_row is not None:
        on_row(rows, "")
    return rows


def _quality_row(model, ids, reference, recipe: str, group_size: int) -> dict:
    copied = copy.deepcopy(model)
    start = time.perf_counter()
    report = quantize(copied, recipe, group_size)
    seconds = time.perf_counter() - start
    logits = sequence_logits(copied, ids)
    return {"recipe": recipe, "group_size": group_size, "perplexity": perplexity(logits, ids),
            **logit_error(reference, logits), "weight_bytes": report.model_bytes_after, "quantize_s": seconds,
            "layers": report.summary()}  # fmt: skip


def quality_document(
    model_name: str, what: str, rows: list[dict], tokens: int, dtype: torch.dtype, text: str = TEXT_SOURCE
) -> dict:
    """The result document (rows + how they were made + environment) for `write_quality`."""
    from attnforge.bench.report import run_environment

    return {
        "what": "quant-quality",
        "model": model_name,
        "weights": what,
        "dtype": str(dtype),
        "text": text,
        "tokens": tokens,
        "rows": rows,
        "environment": run_environment(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": "perplexity of one forward over the whole text; logit error, KL and top-1 agreement vs "
        "the unquantized model at every position; weight_bytes = parameters and buffers, tied "
        "tensors once (the checkpoint's tensors); quantization on CPU, round to nearest with a "
        "per-group clipping search",
    }


def write_quality(doc: dict, folder: str | Path, stem: str) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` under `folder`."""
    from attnforge.bench.report import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / f"{stem}.md"
    from attnforge.bench.accel_tables import quality_markdown

    markdown.write_text(quality_markdown(doc))
    return [write_json(doc, folder / f"{stem}.json"), markdown]
