"""Decode speed per quantization recipe with the accelerator (`attnforge bench quant-speed`; docs/quant.md).

One process: for the unquantized model and each recipe, the bundled architecture with random weights (the
same seed each time; speed does not depend on weight values) is built, quantized (`af.quantize(...,
backend=...)`) and accelerated (CUDA graph + compile on a GPU); warm-up generations, then `runs` measured
ones of `new_tokens` tokens after a `prompt_tokens` prompt, batch 1, EOS ignored. Reported per row: median
decode tok/s, achieved GB/s (weights + K/V read per step / time), weight bytes per step, the ratio to the
unquantized row, and the read bandwidth measured in the same run. Without a GPU the same rows run as a smoke
test (the numbers mean nothing there, and the document says so).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from attnforge import models
from attnforge.accel.accelerator import accelerate
from attnforge.accel.quant.recipes import quantize
from attnforge.bench.accel_tables import speed_markdown
from attnforge.bench.report import run_environment, write_json


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """What one speed run measures (see the module docstring); layers/vocab shrink the model (smoke tests)."""

    group_size: int = 64
    backend: str = "auto"
    prompt_tokens: int = 128
    new_tokens: int = 256
    runs: int = 3
    warmup: int = 1
    layers: int | None = None
    vocab: int | None = None


def measure(model_name: str, recipe: str | None, settings: SpeedSettings, device: torch.device) -> dict:
    """One row: build, quantize (unless `recipe` is None), accelerate, warm up, time `settings.runs`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = {"num_hidden_layers": settings.layers, "vocab_size": settings.vocab}
    model = models.build_model(model_name, dtype=dtype, device=device, seed=0,
                               **{k: v for k, v in overrides.items() if v})  # fmt: skip
    report = quantize(model, recipe, settings.group_size, backend=settings.backend) if recipe else None
    acc = accelerate(model, max_seq_len=settings.prompt_tokens + settings.new_tokens + 8)
    prompt = [(7 * i) % model.config.vocab_size for i in range(settings.prompt_tokens)]
    speeds, bandwidths = [], []
    for run in range(settings.warmup + settings.runs):
        metrics = acc.generate(prompt, max_new_tokens=settings.new_tokens, ignore_eos=True).metrics
        if run >= settings.warmup:
            speeds.append(metrics.decode_tok_s)
            bandwidths.append(metrics.bandwidth_gb_s)
    row = {
        "recipe": recipe or str(dtype).removeprefix("torch."),
        "group_size": settings.group_size if recipe else None,
        "backend": settings.backend if recipe else None,
        "decode_tok_s": statistics.median(speeds),
        "samples_tok_s": speeds,
        "bandwidth_gb_s": statistics.median(bandwidths),
        "weight_bytes": acc.weight_bytes,
        "graph": acc.info["graph"],
        "compile": acc.info["compile"],
        "layers": report.summary() if report else None,
    }
    del acc, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(model_name: str, recipes: list[str], settings: SpeedSettings,
        on_row: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """The unquantized row, then one per recipe; `on_row(document)` after every row (save it there)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = {
        "what": "quant-decode",
        "model": model_name,
        "settings": dataclasses.asdict(settings),
        "environment": run_environment(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": None if device.type == "cuda" else "no CUDA GPU: a smoke test; the numbers mean nothing",
        "rows": [],
    }
    if device.type == "cuda":
        from attnforge.bench.timing import measure_read_bandwidth

        doc["read_gbps"] = round(measure_read_bandwidth() / 1e9)
    for recipe in [None, *recipes]:
        doc["rows"].append(measure(model_name, recipe, settings, device))
        base = doc["rows"][0]["decode_tok_s"]
        for row in doc["rows"]:
            row["ratio"] = row["decode_tok_s"] / base
        if on_row is not None:
            on_row(doc)
    return doc


def write(doc: dict, folder: Path, stem: str) -> list[Path]:
    """`<stem>.json` and `<stem>.md` under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(speed_markdown(doc))
    return [write_json(doc, folder / f"{stem}.json"), folder / f"{stem}.md"]
