"""`attnforge bench accel`: the accelerator against transformers on the same model, in one process.

Rows (each a way to generate greedy tokens with the same weights; bf16, random weights, EOS ignored):
  attnforge                    the accelerator (compiled decode step in a CUDA graph)
  attnforge-no-compile         the accelerator without torch.compile (the graph of the eager step)
  attnforge-tune               the accelerator with inductor's coordinate-descent tuning (tune=True)
  tight-loop                   the model's own forward, transformers' StaticCache, compiled with CUDA graphs
  tight-loop-cd                the same with inductor's coordinate-descent tuning
  transformers-static-compile  model.generate() with the static cache (generate compiles the decode step)
  transformers-dynamic         model.generate() with the default dynamic cache
A batch larger than 1 gets prompts of different lengths (left-padded for transformers; the tight loop, which
has no padding mask, is skipped). Every row reports decode tok/s per sequence, TTFT and the achieved bandwidth
(weights + valid KV bytes per step / time per step), and the run measures the read bandwidth it is compared
to (the weights-only roofline). The document is saved after every row, so a run cut short keeps what it
measured. Without a CUDA device only an agreement check runs (a reduced model, fp32, no timing).
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attnforge.accel.baselines import TightLoop, Timed, transformers_generate

ROWS = (
    "attnforge",
    "tight-loop",
    "transformers-static-compile",
    "tight-loop-cd",
    "transformers-dynamic",
    "attnforge-no-compile",
    "attnforge-tune",
    "attnforge-torch-projections",
)
# rows that are the accelerator with other options: no compile, inductor's coordinate-descent tuning, and the
# model's own matmuls (cuBLAS) for the decode step's products instead of fused_linear
ACCELERATOR_VARIANTS = {
    "attnforge-no-compile": {"compile": False},
    "attnforge-tune": {"tune": True},
    "attnforge-torch-projections": {"projections": "torch"},
}
NEEDS_NO_PADDING = ("tight-loop", "tight-loop-cd")
CPU_ROWS = ("attnforge", "tight-loop", "transformers-dynamic")  # no compiling on a CPU
# the targets, checked in the report (tok/s at a prompt length; ratios to rows; % of the roofline)
TARGETS = {
    "qwen3-0.6b": {
        "tok_s": {128: 1000, 4096: 900},
        "vs": {"transformers-static-compile": 3.5, "tight-loop-cd": 1.35},
    },
    "llama3-8b": {"roofline_pct": 88},
}
BATCH_TARGET = 5.0  # batch > 1: x the best transformers row
# initializer_range 0.2: a random model whose greedy tokens vary (at 0.02 they repeat one token)
CPU_OVERRIDES = {
    "num_hidden_layers": 2,
    "vocab_size": 4096,
    "intermediate_size": 1024,
    "initializer_range": 0.2,
}
CPU_PROMPT, CPU_NEW = 24, 4
NO_GPU_NOTE = (
    "no CUDA GPU: agreement check only (a 2-layer copy of the architecture in fp32, attnforge's kernels "
    "through the Triton interpreter, greedy tokens of every row compared); timings need a CUDA GPU"
)


@dataclass(frozen=True)
class Scenario:
    """`batch` prompts of `prompt_lens` tokens, `new_tokens` new ones each."""

    prompt_lens: tuple[int, ...]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompt_lens)

    @property
    def label(self) -> str:
        lens = self.prompt_lens
        shown = str(lens[0]) if self.batch == 1 else f"{min(lens)}-{max(lens)}"
        return f"batch {self.batch}, prompt {shown}, {self.new_tokens} new"


def scenarios(prompt_tokens: list[int], new_tokens: int, batch: int) -> list[Scenario]:
    """One scenario per prompt length P: batch 1 -> (P,); batch B -> B lengths spread evenly up to P."""
    if batch < 1 or new_tokens < 1 or not prompt_tokens or min(prompt_tokens) < 1:
        raise ValueError(
            f"batch={batch}, new_tokens={new_tokens}, prompt_tokens={prompt_tokens}: all must be >= 1"
        )
    return [
        Scenario(tuple(max(1, p * (i + 1) // batch) for i in range(batch)), new_tokens) for p in prompt_tokens
    ]


def prompt_rows(scenario: Scenario, vocab_size: int) -> list[list[int]]:
    """Deterministic token ids for each prompt (bench/e2e.py's hashed words of its scenario texts)."""
    from attnforge.bench.e2e import SCENARIOS, prompt_token_ids

    return [
        prompt_token_ids(SCENARIOS[i % len(SCENARIOS)].prompt, length, vocab_size)
        for i, length in enumerate(scenario.prompt_lens)
    ]


# ----------------------------------------------------------------------------------------------------------
# The rows


class Contenders:
    """The model, its accelerators and tight loops, built once (the accelerator fuses the weights first, so
    every row runs on the same tensors)."""

    def __init__(self, model, max_batch: int, max_seq_len: int, *, on_gpu: bool) -> None:
        from attnforge.accel import accelerate

        self.model, self.max_seq_len, self.on_gpu = model, max_seq_len, on_gpu
        self.accelerator = accelerate(model, max_batch_size=max_batch, max_seq_len=max_seq_len)
        self._built: dict[str, object] = {}

    def get(self, row: str):
        if row not in self._built:
            self._built[row] = self._build(row)
        return self._built[row]

    def _build(self, row: str):
        from attnforge.accel import accelerate

        if row in ACCELERATOR_VARIANTS:
            return accelerate(self.model, max_batch_size=self.accelerator.max_batch_size,
                              max_seq_len=self.max_seq_len, **ACCELERATOR_VARIANTS[row])  # fmt: skip
        return TightLoop(self.model, self.max_seq_len, tune=row == "tight-loop-cd", compile=self.on_gpu)

    def run(self, row: str, prompts: list[list[int]], new_tokens: int) -> Timed:
        device = self.accelerator.device
        if row == "attnforge" or row in ACCELERATOR_VARIANTS:
            acc = self.accelerator if row == "attnforge" else self.get(row)
            result = acc.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
            m = result.metrics
            return Timed(result.tokens, m.ttft_s, m.decode_s)
        if row in NEEDS_NO_PADDING:
            return self.get(row).generate(torch.tensor(prompts, device=device), new_tokens)
        ids, mask = left_padded(prompts, device)
        cache = "static" if row == "transformers-static-compile" else "dynamic"
        return transformers_generate(self.model, ids, new_tokens, cache=cache, mask=mask)


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` ids left-padded with 0 and their attention mask (transformers' batched generation)."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def measure(contenders: Contenders, row: str, scenario: Scenario, prompts, runs: int, warmup: int) -> dict:
    """Warm-up then measured generations of one row: medians, and the first tokens for agreement."""
    samples: list[Timed] = []
    for index in range(warmup + runs):
        timed = contenders.run(row, prompts, scenario.new_tokens)
        if index >= warmup:
            samples.append(timed)
    per_sequence = [s.decode_tok_s for s in samples if s.decode_tok_s]
    result = {
        "row": row,
        "n": len(samples),
        "ttft_ms": statistics.median(s.ttft_s for s in samples) * 1e3,
        "decode_tok_s": statistics.median(per_sequence) if per_sequence else None,
        "decode_tok_s_runs": per_sequence,
        "first_tokens": [tokens[:32] for tokens in samples[0].tokens],
    }
    if result["decode_tok_s"]:
        result["total_tok_s"] = result["decode_tok_s"] * scenario.batch
    return result


# ----------------------------------------------------------------------------------------------------------
# The run


def run(
    model_name: str = "qwen3-0.6b",
    *,
    prompt_tokens: list[int] = (128, 4096),
    new_tokens: int = 256,
    batch: int = 1,
    rows: list[str] | None = None,
    runs: int = 3,
    warmup: int = 1,
    time_budget_s: float | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides,
) -> dict:
    """Measure `rows` (default: all) on every scenario; returns the result document (see the module doc).

    `overrides` change the architecture (e.g. num_hidden_layers=2). `checkpoint(doc)` gets the document
    after every row.
    """
    from attnforge import models

    rows = list(rows or ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    chosen = scenarios(list(prompt_tokens), new_tokens, batch)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        chosen = [Scenario(tuple(max(4, CPU_PROMPT - 7 * i) for i in range(batch)), CPU_NEW)]
        overrides = {**CPU_OVERRIDES, **overrides}
        rows = [r for r in rows if r in CPU_ROWS] or rows
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = models.load_model(model_name, dtype=dtype, attn_implementation="sdpa", **overrides)
    max_seq_len = max(max(s.prompt_lens) + s.new_tokens for s in chosen)
    contenders = Contenders(model, max(s.batch for s in chosen), max_seq_len, on_gpu=on_gpu)
    doc = _header(model_name, model, contenders, on_gpu, runs, warmup)
    started = time.monotonic()
    for scenario in chosen:
        prompts = prompt_rows(scenario, model.config.vocab_size)
        for row in rows:
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                doc["skipped"].append({"row": row, "scenario": scenario.label, "reason": "time budget spent"})
                continue
            if row in NEEDS_NO_PADDING and scenario.batch > 1:
                doc["skipped"].append({"row": row, "scenario": scenario.label, "reason": "no padding mask"})
                continue
            if progress is not None:
                progress(f"{row}: {scenario.label}")
            doc["rows"].append(_measured_row(contenders, row, scenario, prompts, runs if on_gpu else 1,
                                             warmup if on_gpu else 0, doc))  # fmt: skip
            finish(doc, on_gpu)
            if checkpoint is not None:
                checkpoint(doc)
    finish(doc, on_gpu)
    return doc


def _measured_row(contenders, row, scenario, prompts, runs, warmup, doc) -> dict:
    base = {"scenario": scenario.label, "batch": scenario.batch, "prompt_tokens": list(scenario.prompt_lens),
            "new_tokens": scenario.new_tokens}  # fmt: skip
    try:
        result = {**base, **measure(contenders, row, scenario, prompts, runs, warmup), "status": "ok"}
    except Exception as error:  # noqa: BLE001 - a failed row is recorded and the run goes on
        return {**base, "row": row, "status": f"error: {type(error).__name__}: {error}"[:500]}
    finally:
        if contenders.on_gpu:
            torch.cuda.empty_cache()
    if row.startswith("attnforge"):
        acc = contenders.accelerator if row == "attnforge" else contenders.get(row)
        result["accelerator"] = acc.info
    steps = scenario.new_tokens - 1
    kv_tokens = sum(scenario.prompt_lens) + scenario.batch * (steps + 1) / 2  # mean valid keys per step
    result["bytes_per_step"] = doc["weight_bytes"] + kv_tokens * doc["kv_bytes_per_token"]
    if result.get("decode_tok_s"):
        result["bandwidth_gb_s"] = result["bytes_per_step"] * result["decode_tok_s"] / 1e9
    return result


def _header(model_name: str, model, contenders: Contenders, on_gpu: bool, runs: int, warmup: int) -> dict:
    from attnforge.bench import e2e, report
    from attnforge.bench.timing import measure_read_bandwidth

    acc = contenders.accelerator
    config = model.config
    doc = {
        "what": "accelerate",
        "model": model_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": report.run_environment(),
        "dtype": str(acc.dtype).removeprefix("torch."),
        "weights": "random" if _bundled(model_name) else "checkpoint",
        "architecture": {k: getattr(config, k, None) for k in e2e.ARCHITECTURE_FIELDS},
        "weight_bytes": acc.weight_bytes,
        "kv_bytes_per_token": acc.cache.shape.bytes_per_token(),
        "method": METHOD if on_gpu else NO_GPU_NOTE,
        "runs": runs,
        "warmup": warmup,
        "rows": [],
        "skipped": [],
    }
    if on_gpu:
        read = measure_read_bandwidth()
        doc["ceilings"] = {"read_gbps": read / 1e9}
        doc["roofline_tok_s"] = read / acc.weight_bytes
    return doc


METHOD = (
    "greedy, EOS ignored, bf16, random weights; per row and scenario one warm-up generation (compiles and "
    "captures there) then `runs` measured ones, rows one after the other in one process on the same weights; "
    "TTFT = start to the first new token on the host (device synchronized), decode tok/s = (new - 1) / time "
    "after it, per sequence (median over runs); achieved bandwidth = (weights + mean valid KV bytes) per "
    "step x steps/s; roofline = read bandwidth measured in this run (sum over a 4 GiB bf16 tensor) / weight "
    "bytes"
)


def _bundled(name: str) -> bool:
    from attnforge.models import is_bundled

    return is_bundled(name)


def finish(doc: dict, on_gpu: bool) -> None:
    """Ratios to every other row per scenario, the divergence of greedy tokens from transformers', % of the
    roofline, the target checks; without a GPU, whether every row gave the same tokens."""
    by_scenario: dict[str, dict[str, dict]] = {}
    for row in doc["rows"]:
        if row["status"] == "ok":
            by_scenario.setdefault(row["scenario"], {})[row["row"]] = row
    for results in by_scenario.values():
        for row in results.values():
            _relate(row, results, doc)
    if not on_gpu:
        firsts = [r["first_tokens"] for results in by_scenario.values() for r in results.values()]
        doc["tokens_match"] = bool(firsts) and all(f == firsts[0] for f in firsts)
        for row in doc["rows"]:  # CPU times of a reduced model mean nothing: keep the tokens only
            for key in TIMINGS:
                row.pop(key, None)
        return
    doc["targets"] = check_targets(doc, by_scenario)


TIMINGS = ("ttft_ms", "decode_tok_s", "decode_tok_s_runs", "total_tok_s", "bandwidth_gb_s", "speedup_vs",
           "pct_of_roofline")  # fmt: skip


def _relate(row: dict, results: dict[str, dict], doc: dict) -> None:
    mine = row.get("decode_tok_s")
    row["speedup_vs"] = {
        other: mine / r["decode_tok_s"]
        for other, r in results.items()
        if other != row["row"] and mine and r.get("decode_tok_s")
    }
    row["first_divergence_from"] = {
        other: _divergence(row["first_tokens"], r["first_tokens"])
        for other, r in results.items()
        if other.startswith("transformers") and other != row["row"]
    }
    if mine and doc.get("roofline_tok_s"):
        row["pct_of_roofline"] = 100 * mine / doc["roofline_tok_s"]


def _divergence(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first token where two greedy runs differ (any sequence), None if they agree."""
    first = None
    for x, y in zip(a, b, strict=False):
        for index, (s, t) in enumerate(zip(x, y, strict=False)):
            if s != t:
                first = index if first is None else min(first, index)
                break
    return first


def check_targets(doc: dict, by_scenario: dict[str, dict[str, dict]]) -> list[dict]:
    """Each target of the issue this run can judge: what was asked, what was measured, met or not."""
    checks = []
    target = TARGETS.get(doc["model"], {})
    for label, results in by_scenario.items():
        ours = results.get("attnforge")
        if ours is None or not ours.get("decode_tok_s"):
            continue
        if ours["batch"] > 1:
            best = max((r["decode_tok_s"] for k, r in results.items() if k.startswith("transformers")
                        and r.get("decode_tok_s")), default=None)  # fmt: skip
            if best:
                checks.append(_check(label, f">= {BATCH_TARGET}x the best transformers row",
                                     ours["decode_tok_s"] / best, BATCH_TARGET))  # fmt: skip
            continue
        wanted = target.get("tok_s", {}).get(ours["prompt_tokens"][0])
        if wanted:
            checks.append(_check(label, f">= {wanted} tok/s", ours["decode_tok_s"], wanted))
        for other, ratio in target.get("vs", {}).items():
            if other in ours["speedup_vs"]:
                checks.append(_check(label, f">= {ratio}x {other}", ours["speedup_vs"][other], ratio))
        if "roofline_pct" in target and "pct_of_roofline" in ours:
            checks.append(_check(label, f">= {target['roofline_pct']}% of the weights-only roofline",
                                 ours["pct_of_roofline"], target["roofline_pct"]))  # fmt: skip
    return checks


def _check(scenario: str, target: str, measured: float, wanted: float) -> dict:
    return {"scenario": scenario, "target": target, "measured": measured, "met": measured >= wanted}


# ----------------------------------------------------------------------------------------------------------
# Saving


def save(doc: dict, out_dir: Path | str, stem: str) -> list[Path]:
    """`<stem>.json` and `<stem>.md` under out_dir."""
    from attnforge.bench.accel_tables import accel_markdown
    from attnforge.bench.report import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(accel_markdown(doc))
    return [write_json(doc, out / f"{stem}.json"), out / f"{stem}.md"]
