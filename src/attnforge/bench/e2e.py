"""End-to-end generation scenarios: 20 real prompts, TTFT, prefill and decode tok/s, total time, peak memory.

Each scenario is a prompt text, a prompt length in tokens and an exact number of new tokens (EOS is ignored:
min_new_tokens = max_new_tokens). No tokenizer is downloaded: token ids are a deterministic hash of the
prompt's words, repeated to the scenario's length; speed does not depend on which ids they are (nor on the
random weights). Modes: `quick` (5 scenarios) and `full` (20) measure the attnforge-patched model;
`compare` runs plain transformers (sdpa) and attnforge interleaved A B A B in one process and fails unless the
optimizer's statistics show attnforge kernels running on the attnforge side.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnforge.bench import report, stats
from attnforge.bench.generation import generate_alternating, generate_once

MODES = ("quick", "full", "compare")
TOKENIZATION = (
    "no tokenizer (offline): token ids are blake2b hashes of the prompt's words and punctuation, "
    "repeated cyclically to the scenario's prompt length"
)
NO_GPU_NOTE = (
    "no CUDA GPU: agreement check only (tiny prompt, few tokens, baseline vs attnforge greedy tokens and "
    "kernel statistics); timings need a CUDA GPU"
)
CPU_PROMPT_TOKENS, CPU_NEW_TOKENS = 24, 4
CPU_SCENARIOS = 1  # without a GPU: the agreement check needs one scenario
# "measured": the optimizer's own choice (kernels where the tuning store measured them faster);
# "all": attnforge's kernels wherever they support the call (require_measurement=False);
# "none": every call routed to torch (what a user gets where no kernel wins: the fallback's cost alone).
KERNEL_POLICIES = ("measured", "all", "none")
# "dynamic": transformers' default DynamicCache; "static": its StaticCache, which generate() compiles.
CACHES = ("dynamic", "static")
# How the two sides of `compare` share the time: whole runs in turn (A B, B A, ...), or token by token within
# each run (dynamic cache only: the host's speed drifts between runs on shared machines, see generation.py).
INTERLEAVES = ("runs", "tokens")

_CODE = """Write a Python module that implements a thread-safe LRU cache with a time-to-live per entry.
It must expose get(key), put(key, value, ttl_seconds) and a stats() method that reports hits, misses and
evictions. Use only the standard library, include type hints and docstrings, and add pytest tests that
cover expiry, eviction order under concurrent access, and the behaviour when the capacity is one. Explain
briefly why you chose an OrderedDict over a heap, and what the complexity of each operation is."""
_REASONING = """A train leaves Lyon at 08:10 and travels to Paris at an average of 240 km/h; a second train
leaves Paris at 08:40 towards Lyon at 200 km/h on a parallel track. The distance is 465 km. Think step by
step: at what time do the trains pass each other, and how far from Paris? Then check your answer by computing
the distance each train has covered at that moment, and explain what changes if the first train stops for
ten minutes in Dijon, which lies 315 km from Paris."""
_CREATIVE = """Write a short story set in a lighthouse on a cold northern island, where the keeper receives
a letter that was posted forty years ago. The story should have three scenes: the arrival of the supply boat,
the evening the keeper finally opens the letter, and a storm that night. Use concrete sensory detail, keep
the dialogue sparse, and end on an image rather than an explanation."""
_DOCS = """## Configuring the ingestion service

The ingestion service reads events from the message queue, validates them against the schema registry,
and writes them to the columnar store in batches. Each worker holds one partition lease at a time; leases are
renewed every ten seconds and expire after thirty. Batches are flushed when they reach 64 MiB or when five
seconds have passed since the first event, whichever comes first. Failed writes are retried with exponential
backoff starting at 200 ms and capped at 30 s; after eight attempts the batch is moved to the dead-letter
topic together with the error and the schema version. Operators can pause a partition with the admin API,
which drains in-flight batches before releasing the lease. Metrics are exported on port 9102: events per
second, batch latency percentiles, lease renewals and dead-letter counts. The configuration file is YAML;
every key can be overridden by an environment variable of the same name in upper case with dots replaced
by underscores."""
_CONVERSATION = """User: I'm planning a week of hiking in the Dolomites in late September. Is that too late
in the season?
Assistant: Late September is often a very good time: the summer crowds are gone and the weather is usually
stable, but some huts close around the 20th, so check opening dates before you book.
User: Which routes would you suggest for someone fit but without via ferrata experience?
Assistant: The Alta Via 1 is the classic choice; it is mostly walking on good paths with a few exposed
sections. The Puez-Odle plateau and the Tre Cime circuit are also good day hikes.
User: How should I handle luggage if I do the Alta Via 1 hut to hut?"""
_ARTICLE = """Attention lets each token of a sequence weigh every earlier token when it computes its next
representation. During generation the keys and values of earlier tokens are kept in a cache, so each new
token needs one pass over that cache per layer: the cost of a decode step grows with the context, and at long
contexts reading the cache dominates the time. Grouped-query attention shares each key and value head
between several query heads, which shrinks the cache and the bytes read per step. A kernel that serves all
query heads of a group from one read of the cache, and splits long caches across many processors, can approach
the memory bandwidth of the device. Prefill is different: the whole prompt is processed at once, the work
grows with the square of its length, and the tensor cores set the limit instead of memory."""
_LIST = """Produce a numbered list of practical tips for keeping a sourdough starter healthy, one tip per
line, each starting with a verb. Keep going with new tips, covering feeding ratios, flour types, temperature,
storage in the fridge, reviving a neglected starter, and signs of contamination."""
_TURN = """User: Summarize what we discussed so far and add one new question about the next step of the plan.
Assistant: So far we covered the goals of the migration, the order of the services, the rollback procedure
and the monitoring we need before switching traffic. The next open question is who signs off each stage."""


@dataclass(frozen=True)
class Scenario:
    """One generation: `prompt` repeated/cut to `prompt_tokens` tokens, then exactly `new_tokens` new ones."""

    name: str
    category: str
    prompt: str
    prompt_tokens: int
    new_tokens: int


SCENARIOS = [
    Scenario("context-short", "context length", _CONVERSATION, 128, 100),
    Scenario("context-medium", "context length", _ARTICLE, 1024, 100),
    Scenario("context-long", "context length", _DOCS, 4096, 100),
    Scenario("context-very-long", "context length", _DOCS + "\n\n" + _ARTICLE, 16384, 100),
    Scenario("generate-10", "generation length", _REASONING, 256, 10),
    Scenario("generate-100", "generation length", _CREATIVE, 256, 100),
    Scenario("generate-1000", "generation length", _CREATIVE, 256, 1000),
    Scenario("generate-2000", "generation length", _CREATIVE, 256, 2000),
    Scenario("generate-5000", "generation length", _CREATIVE, 256, 5000),
    Scenario("code", "use case", _CODE, 384, 300),
    Scenario("reasoning", "use case", _REASONING, 256, 400),
    Scenario("creative-writing", "use case", _CREATIVE, 192, 500),
    Scenario("technical-docs", "use case", _DOCS, 2048, 300),
    Scenario("conversation", "use case", _CONVERSATION, 640, 150),
    Scenario("progressive-context-2k", "memory pressure", _CONVERSATION + "\n" + _TURN, 2048, 100),
    Scenario("progressive-context-4k", "memory pressure", _CONVERSATION + "\n" + _TURN, 4096, 100),
    Scenario("progressive-context-8k", "memory pressure", _CONVERSATION + "\n" + _TURN, 8192, 100),
    Scenario("repetitive-short-prompt", "memory pressure", _LIST, 64, 1000),
    Scenario("repetitive-long-prompt", "memory pressure", _LIST + "\n" + _ARTICLE, 2048, 2000),
    Scenario("long-context-long-generation", "memory pressure", _DOCS, 8192, 1000),
]
QUICK = ("context-short", "context-medium", "context-long", "generate-10", "conversation")


def scenarios_for(mode: str, *, all_scenarios: bool = False) -> list[Scenario]:
    """The scenarios a mode runs: quick 5, full 20; compare the quick 5 unless `all_scenarios`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not known; accepted: {MODES}")
    if mode == "full" or all_scenarios:
        return list(SCENARIOS)
    return [s for s in SCENARIOS if s.name in QUICK]


def scenarios_named(names: list[str]) -> list[Scenario]:
    """The scenarios of these names, in the order given; an unknown name raises ValueError listing them."""
    by_name = {s.name: s for s in SCENARIOS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]


def prompt_token_ids(text: str, length: int, vocab_size: int) -> list[int]:
    """`length` token ids from `text`: each word/punctuation mark hashed into [100, vocab_size - 100)."""
    if length <= 0:
        raise ValueError(f"length={length} must be a positive number of tokens")
    if vocab_size <= 300:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs > 300)")
    words = re.findall(r"\w+|[^\w\s]", text)
    if not words:
        raise ValueError("the prompt text has no words")
    span = vocab_size - 200
    ids = [
        100 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % span
        for w in words
    ]
    return [ids[i % len(ids)] for i in range(length)]


# ----------------------------------------------------------------------------------------------------------
# One generation, timed


METRICS = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "median_token_tok_s", "total_s", "peak_mem_gib")


def summarize_runs(runs: list[dict]) -> dict:
    """Median and 95% interval per metric over measured runs (metrics a run lacks are left out)."""
    summary = {}
    for metric in METRICS:
        values = [run[metric] for run in runs if run.get(metric) is not None]
        if values:
            summary[metric] = stats.summarize_samples(values).as_dict()
    return summary


# ----------------------------------------------------------------------------------------------------------
# Sides: plain transformers and attnforge on one model


class _Sides:
    """Switches one model between plain transformers (sdpa) and attnforge, and reads the optimizer's stats."""

    def __init__(self, model) -> None:
        from attnforge.integrations import transformers as integration
        from attnforge.optimizer import get_optimizer

        self.model, self.integration, self.optimizer = model, integration, get_optimizer()

    def use(self, side: str) -> None:
        if side == "attnforge":
            if not self.integration.patch_model(self.model):
                raise ValueError(
                    f"attnforge does not support this model: {self.integration.family_support(self.model)[1]}"
                )
        else:
            self.integration.unpatch_model(self.model)
        self.optimizer.reset_stats()

    def switch(self, side: str) -> None:
        """Run as `side` from the next forward on, inside a generate call, after `use("attnforge")`."""
        self.model.set_attn_implementation(self.integration.IMPLEMENTATION if side == "attnforge" else "sdpa")

    def stats(self) -> dict:
        return self.optimizer.get_stats()


def merge_stats(total: dict, stats_now: dict) -> dict:
    """Two optimizer-statistics dicts added up (counts, per-kernel and per-reason counts; rate recomputed)."""
    merged = dict(total)
    for key in ("calls", "optimized", "fallbacks", "quantized_calls"):
        if key in merged or key in stats_now:
            merged[key] = merged.get(key, 0) + stats_now.get(key, 0)
    for key in ("by_kernel", "fallback_reasons"):
        merged[key] = dict(merged.get(key, {}))
        for name, count in stats_now.get(key, {}).items():
            merged[key][name] = merged[key].get(name, 0) + count
    merged["optimization_rate"] = merged["optimized"] / merged["calls"] if merged.get("calls") else 0.0
    return merged


def run_scenario(
    model,
    sides: _Sides,
    scenario: Scenario,
    order: list[str],
    *,
    runs: int,
    warmup: int,
    vocab_size: int,
    device,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    cache: str = "dynamic",
    interleave: str = "runs",
) -> dict:
    """Warm-up then measured runs of one scenario, the sides in `order` interleaved (A B, B A, ...), or with
    interleave="tokens" taking turns token by token within each run (generation.generate_alternating; the
    side that goes first alternates between runs).

    With a static cache the sides run one after the other instead (all of A, then all of B): switching the
    attention implementation recompiles transformers' compiled decode step, so interleaving would time
    compilations.
    """
    length = prompt_tokens or scenario.prompt_tokens
    new = new_tokens or scenario.new_tokens
    ids = torch.tensor([prompt_token_ids(scenario.prompt, length, vocab_size)], device=device)
    if interleave == "tokens":
        outcome = _alternating_runs(model, sides, ids, new, order, warmup, runs)
    else:
        outcome = _separate_runs(model, sides, ids, new, order, warmup, runs, cache)
    measured, side_stats, first_tokens = outcome
    result = {
        "name": scenario.name,
        "category": scenario.category,
        "prompt_tokens": length,
        "new_tokens": new,
        "sides": {},
    }
    for side in order:
        result["sides"][side] = {
            "n": len(measured[side]),
            "runs": measured[side],
            "summary": summarize_runs(measured[side]),
            "optimizer_stats": side_stats[side],
            "first_tokens": first_tokens.get(side, [])[:16],
        }
    if len(order) == 2:
        result["improvement"] = improvement(result["sides"]["baseline"], result["sides"]["attnforge"])
        if interleave == "tokens":
            paired = report.paired_step_ratio(result["sides"])
            if paired is not None:
                result["improvement"]["paired_step_tok_s"] = paired
    return result


def _separate_runs(model, sides: _Sides, ids, new: int, order: list[str], warmup: int, runs: int, cache: str):
    """One generate call per side and run: (measured runs per side, statistics per side, first tokens)."""
    measured: dict[str, list[dict]] = {side: [] for side in order}
    side_stats: dict[str, dict] = {side: {} for side in order}
    first_tokens: dict[str, list[int]] = {}
    for index, side in _schedule(order, warmup + runs, interleaved=cache == "dynamic"):
        sides.use(side)
        run = generate_once(model, ids, new, cache)
        side_stats[side] = merge_stats(side_stats[side], sides.stats())
        tokens = run.pop("tokens")
        if index >= warmup:
            measured[side].append(run)
            first_tokens.setdefault(side, tokens)
    return measured, side_stats, first_tokens


def _alternating_runs(model, sides: _Sides, ids, new: int, order: list[str], warmup: int, runs: int):
    """Both sides in each generate call, token by token (dynamic cache only); the same three as
    `_separate_runs`. Every attnforge call of a run is the attnforge side's (the baseline makes none)."""
    measured: dict[str, list[dict]] = {side: [] for side in order}
    side_stats: dict[str, dict] = {side: {} for side in order}
    first_tokens: dict[str, list[int]] = {}
    for index in range(warmup + runs):
        turn = tuple(order if index % 2 == 0 else order[::-1])
        sides.use("attnforge")  # registered and patched; the turns only switch the implementation
        run = generate_alternating(model, ids, new, sides.switch, turn)
        side_stats["attnforge"] = merge_stats(side_stats["attnforge"], sides.stats())
        if index >= warmup:
            for side in order:
                measured[side].append({**run[side], "new_tokens": run["new_tokens"], "turn": list(turn)})
                first_tokens.setdefault(side, run["tokens"])
    sides.use("baseline")
    return measured, side_stats, first_tokens


def _schedule(order: list[str], count: int, *, interleaved: bool) -> list[tuple[int, str]]:
    """(run index, side) pairs: A B, B A, A B ... when interleaved, else A A A ... B B B."""
    if not interleaved:
        return [(index, side) for side in order for index in range(count)]
    return [(index, side) for index in range(count) for side in (order if index % 2 == 0 else order[::-1])]


def improvement(baseline: dict, optimized: dict) -> dict:
    """attnforge / baseline per metric, oriented so > 1 means attnforge is better (time ratios inverted)."""
    out = {}
    for metric, lower_is_better in (
        ("ttft_ms", True),
        ("prefill_tok_s", False),
        ("decode_tok_s", False),
        ("median_token_tok_s", False),
        ("total_s", True),
    ):
        a, b = baseline["summary"].get(metric), optimized["summary"].get(metric)
        if a and b and a["median"] > 0 and b["median"] > 0:
            out[metric] = a["median"] / b["median"] if lower_is_better else b["median"] / a["median"]
    return out


# ----------------------------------------------------------------------------------------------------------
# The suite


def run(
    model_name: str = "qwen3-0.6b",
    *,
    mode: str = "quick",
    runs: int | None = None,
    warmup: int = 1,
    all_scenarios: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[str, int], None] | None = None,
    time_budget_s: float | None = None,
    kernels: str = "measured",
    cache: str = "dynamic",
    interleave: str = "runs",
    names: list[str] | None = None,
    prompt_tokens: int | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    **config_overrides,
) -> dict:
    """Run the scenarios of `mode` and return the result document.

    `checkpoint(doc)` gets the document after every scenario. Without a CUDA device only the agreement check
    runs (see NO_GPU_NOTE) on the first scenario. `config_overrides` change the architecture (tests build
    tiny models). When the attnforge side ran no attnforge kernel, `doc["failure"]` says so: such a comparison
    would pit torch against torch.
    """
    from attnforge import models

    chosen = scenarios_for(mode, all_scenarios=all_scenarios) if not names else scenarios_named(names)
    _check_choices(kernels, cache, interleave, mode)
    device = _pick_device(device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = models.load_model(
        model_name, dtype=dtype, device=device, attn_implementation="sdpa", **config_overrides
    )
    sides = _Sides(model)
    previous = sides.optimizer.settings
    sides.optimizer.configure(
        require_measurement=kernels != "all", kernels=() if kernels == "none" else previous.kernels
    )
    order = ["baseline", "attnforge"] if (mode == "compare" or not on_gpu) else ["attnforge"]
    if not on_gpu:
        chosen = chosen[:CPU_SCENARIOS]  # one short scenario shows agreement; more would only repeat it
    runs = runs or (3 if mode != "full" else 5)
    method = _method(on_gpu, runs, warmup, order, cache, interleave)
    doc = _new_document(model_name, model.config, mode=mode, on_gpu=on_gpu, dtype=dtype, kernels=kernels,
                        cache=cache, method=method)  # fmt: skip
    options = dict(runs=runs, warmup=warmup, device=device, cache=cache, prompt_tokens=prompt_tokens,
                   interleave=interleave)  # fmt: skip
    _run_scenarios(doc, model, sides, chosen, order, options, progress=progress, time_budget_s=time_budget_s,
                   checkpoint=checkpoint)  # fmt: skip
    sides.use("baseline")
    sides.optimizer.configure(require_measurement=previous.require_measurement, kernels=previous.kernels)
    _finish(doc, on_gpu)
    return doc


def _run_scenarios(doc: dict, model, sides, chosen: list[Scenario], order: list[str], options: dict, *,
                   progress, time_budget_s: float | None, checkpoint) -> None:  # fmt: skip
    """Each scenario in turn, appended to doc["scenarios"] (or doc["skipped"] with the reason)."""
    on_gpu = options["device"].type == "cuda"
    runner = _gpu_scenario if on_gpu else _cpu_scenario
    max_positions = getattr(model.config, "max_position_embeddings", None) or 10**9
    started = time.monotonic()
    for scenario in chosen:
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            doc["skipped"].append(
                {"name": scenario.name, "reason": f"time budget of {time_budget_s:g} s spent"}
            )
            continue
        if progress is not None:
            progress(scenario.name, len(chosen))
        if on_gpu and scenario.prompt_tokens + scenario.new_tokens > max_positions:
            doc["skipped"].append({"name": scenario.name, "reason": _too_long(scenario, max_positions)})
            continue
        doc["scenarios"].append(runner(model, sides, scenario, order, **options))
        if checkpoint is not None:  # a run cut short keeps the scenarios it finished
            partial = dict(doc)
            _finish(partial, on_gpu)
            checkpoint(partial)


def _check_choices(kernels: str, cache: str, interleave: str = "runs", mode: str = "compare") -> None:
    if kernels not in KERNEL_POLICIES:
        raise ValueError(f"kernels={kernels!r} is not known; accepted: {KERNEL_POLICIES}")
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r} is not known; accepted: {CACHES}")
    if interleave not in INTERLEAVES:
        raise ValueError(f"interleave={interleave!r} is not known; accepted: {INTERLEAVES}")
    if interleave == "tokens" and (cache != "dynamic" or mode != "compare"):
        raise ValueError(
            f"interleave='tokens' takes turns between two sides with a dynamic cache: it needs "
            f"mode='compare' and cache='dynamic' (got mode={mode!r}, cache={cache!r})"
        )


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "vocab_size")  # fmt: skip


def _new_document(model_name: str, config, *, mode: str, on_gpu: bool, dtype: torch.dtype, kernels: str,
                  cache: str, method: str) -> dict:  # fmt: skip
    """The result document before any scenario ran."""
    return {
        "what": "e2e",
        "model": model_name,
        "mode": mode if on_gpu else f"{mode} (agreement check)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": report.run_environment(),
        "tokenization": TOKENIZATION,
        "dtype": str(dtype)[6:],
        "architecture": {k: getattr(config, k, None) for k in ARCHITECTURE_FIELDS},
        "method": method,
        "kernel_policy": kernels,
        "cache": cache,
        "note": None if on_gpu else NO_GPU_NOTE,
        "scenarios": [],
        "skipped": [],
    }


def _too_long(scenario: Scenario, max_positions: int) -> str:
    return (
        f"{scenario.prompt_tokens} + {scenario.new_tokens} tokens exceed "
        f"max_position_embeddings={max_positions}"
    )


def _gpu_scenario(model, sides, scenario: Scenario, order: list[str], **options) -> dict:
    """Warm-up and measured runs of one scenario on the GPU."""
    result = run_scenario(model, sides, scenario, order, vocab_size=model.config.vocab_size, **options)
    torch.cuda.empty_cache()
    return result


def _cpu_scenario(model, sides, scenario: Scenario, order: list[str], *, device, **_timing) -> dict:
    """The agreement check: one short untimed run per side (the timing options do not apply)."""
    vocab = model.config.vocab_size
    result = run_scenario(model, sides, scenario, order, runs=1, warmup=0, vocab_size=vocab, device=device,
                          prompt_tokens=CPU_PROMPT_TOKENS, new_tokens=CPU_NEW_TOKENS)  # fmt: skip
    for side in result["sides"].values():
        side.pop("runs"), side.pop("summary")
    result.pop("improvement", None)
    return result


def planned_scenarios(mode: str, *, all_scenarios: bool = False, names: list[str] | None = None,
                      on_gpu: bool = True) -> tuple[int, str | None]:  # fmt: skip
    """How many scenarios `run` will start, and why fewer than the mode names when it runs fewer."""
    chosen = scenarios_for(mode, all_scenarios=all_scenarios) if not names else scenarios_named(names)
    if on_gpu or len(chosen) <= CPU_SCENARIOS:
        return len(chosen), None
    return CPU_SCENARIOS, (
        f"no CUDA GPU: {CPU_SCENARIOS} of the {len(chosen)} scenarios runs, as an agreement check of the "
        "greedy tokens (more would only repeat it, slowly, with nothing timed)"
    )


def summarize_scenarios(doc: dict, timed: bool) -> dict:
    """Set the attnforge side's total statistics, the overall (geometric mean) improvements and, for an
    untimed agreement check, whether the greedy tokens matched; returns the total statistics."""
    stats_total: dict = {}
    for result in doc["scenarios"]:
        if "attnforge" in result["sides"]:
            stats_total = merge_stats(stats_total, result["sides"]["attnforge"]["optimizer_stats"])
    doc["optimizer_stats"] = stats_total
    ratios: dict[str, list[float]] = {}
    for result in doc["scenarios"]:
        for metric, value in result.get("improvement", {}).items():
            ratios.setdefault(metric, []).append(value)
    doc["overall"] = {metric: stats.geometric_mean(values) for metric, values in ratios.items()}
    if not timed:
        doc["tokens_match"] = all(
            r["sides"]["baseline"]["first_tokens"] == r["sides"]["attnforge"]["first_tokens"]
            for r in doc["scenarios"]
        )
    return stats_total


def _finish(doc: dict, on_gpu: bool) -> None:
    """The summary (summarize_scenarios) and the kernels-ran assertion."""
    stats_total = summarize_scenarios(doc, on_gpu)
    if doc["scenarios"] and not stats_total.get("optimized") and doc.get("kernel_policy") != "none":
        doc["failure"] = (
            "attnforge kernels did not run on the attnforge side (optimizer stats: "
            f"{stats_total}); the comparison would be torch against torch and is not valid"
        )


def _method(on_gpu: bool, runs: int, warmup: int, order: list[str], cache: str = "dynamic",
            interleave: str = "runs") -> str:  # fmt: skip
    if not on_gpu:
        return (
            f"{CPU_PROMPT_TOKENS}-token prompt, {CPU_NEW_TOKENS} greedy tokens, baseline (sdpa) and "
            "attnforge "
            "on one float32 model; tokens and optimizer statistics compared, nothing timed"
        )
    return (
        "model.generate greedy, EOS ignored (min_new_tokens = max_new_tokens), batch 1, bf16, "
        + ("dynamic cache; " if cache == "dynamic" else "static cache (generate compiles the decode step); ")
        + f"{warmup} warm-up and {runs} measured runs per scenario of {' and '.join(order)}"
        + _sharing(order, cache, interleave)
        + "; TTFT = time to the first new token (device synced), decode tok/s = (new - 1) / time after it, "
        "median token tok/s = 1 / the median time between two new tokens (a host hiccup moves it little); "
        + (
            "paired step = the median over adjacent steps of the two sides of their speed ratio; "
            if interleave == "tokens" and len(order) == 2
            else ""
        )
        + "median and 95% interval of the median; peak memory = torch.cuda.max_memory_allocated per run"
    )


def _sharing(order: list[str], cache: str, interleave: str) -> str:
    """How the two sides shared the time, for the method line."""
    if len(order) != 2:
        return ""
    if cache == "static":
        return ", one side after the other in one process"
    if interleave == "tokens":
        return (
            ", taking turns token by token within each run (the switch between them untimed; the side that "
            "runs the prefill alternates between runs, so TTFT and total time come from half the runs each)"
        )
    return ", interleaved A B / B A in one process"
