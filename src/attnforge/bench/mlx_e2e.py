"""`attnforge bench e2e --backend mlx`: the end-to-end scenarios (bench/e2e.py) through mlx-lm's generation.

The same Scenario list and prompt token ids as the torch side; the model is a bundled architecture with random
weights (`integrations.mlx_models.build_model`) or a local MLX model directory. The two sides are mlx-lm as
installed ("baseline") and mlx-lm patched by attnforge ("attnforge"). With a Metal device (a Mac) the
scenarios are timed; without one (Linux: MLX's CPU backend runs on reference BLAS) only agreement is checked:
one scenario, a tiny prompt, a few greedy tokens per side, compared, nothing timed.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

from attnforge.bench import e2e, report
from attnforge.environment import package_version
from attnforge.integrations import MLX_INSTALL_HINT

try:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
except ImportError as error:  # pragma: no cover - exercised by hiding mlx in the tests
    raise ImportError(MLX_INSTALL_HINT) from error

from attnforge.integrations import mlx_lm as integration  # noqa: E402 - after the check above
from attnforge.integrations import mlx_models  # noqa: E402

NO_METAL_NOTE = (
    "no Metal device: agreement check only (tiny prompt, few tokens, mlx-lm unpatched vs patched greedy "
    "tokens and dispatch statistics); timings need a Mac with Apple silicon"
)
BASELINE_NOTE = (
    "every attention call on the attnforge side ran mx.fast SDPA through attnforge's dispatch (no faster MLX "
    "implementation is measured): the two sides differ only by the dispatch"
)
# "measured": the shared policy's own choice; "all": attnforge's MLX implementations wherever they may run.
KERNEL_POLICIES = e2e.KERNEL_POLICIES


def on_metal() -> bool:
    """True when MLX runs on a Metal GPU."""
    return mx.default_device().type == mx.gpu and mx.metal.is_available()


def load(model_name: str, *, dtype: mx.Dtype, **config_overrides) -> tuple:
    """(model, config dict): a bundled architecture with random weights, or a local MLX model directory."""
    from attnforge.models import is_bundled, load_config

    if is_bundled(model_name):
        config = load_config(model_name, **config_overrides).to_dict()
        return mlx_models.build_model(config, dtype=dtype), config
    if not Path(model_name).is_dir():
        raise ValueError(
            f"model={model_name!r} is neither a bundled architecture nor a local MLX model directory"
        )
    if config_overrides:
        raise ValueError(f"config overrides {sorted(config_overrides)} apply to bundled architectures only")
    from mlx_lm.utils import load_model

    return load_model(Path(model_name))


def generate_once(model, prompt_ids: list[int], new_tokens: int) -> dict:
    """Greedy generation of exactly `new_tokens` tokens (mlx-lm's generate_step; EOS does not stop it)."""
    mx.reset_peak_memory()
    tokens, times = [], []
    start = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=new_tokens):
        tokens.append(int(token))  # generate_step yields host ints: the step has been evaluated
        times.append(time.perf_counter())
    first = times[0] - start
    decode_s = times[-1] - times[0]
    return {
        "ttft_ms": first * 1e3,
        "prefill_tok_s": len(prompt_ids) / first,
        "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "total_s": times[-1] - start,
        "peak_mem_gib": mx.get_peak_memory() / 2**30,
        "tokens": tokens,
    }


def _use(side: str) -> None:
    if side == "attnforge":
        integration.patch_mlx_lm()
    else:
        integration.unpatch_mlx_lm()
    integration.reset_stats()


def run_scenario(model, scenario: e2e.Scenario, order: list[str], *, runs: int, warmup: int, vocab_size: int,
                 prompt_tokens: int | None = None, new_tokens: int | None = None) -> dict:  # fmt: skip
    """Warm-up then measured runs of one scenario, the sides in `order` interleaved (A B, then B A)."""
    length = prompt_tokens or scenario.prompt_tokens
    new = new_tokens or scenario.new_tokens
    ids = e2e.prompt_token_ids(scenario.prompt, length, vocab_size)
    measured: dict[str, list[dict]] = {side: [] for side in order}
    side_stats: dict[str, dict] = {side: {} for side in order}
    for index in range(warmup + runs):
        for side in order if index % 2 == 0 else order[::-1]:
            _use(side)
            result = generate_once(model, ids, new)
            side_stats[side] = e2e.merge_stats(side_stats[side], integration.get_stats())
            if index >= warmup:
                measured[side].append(result)
    result = {"name": scenario.name, "category": scenario.category, "prompt_tokens": length,
              "new_tokens": new, "sides": {}}  # fmt: skip
    for side in order:
        tokens = [run.pop("tokens") for run in measured[side]]
        result["sides"][side] = {
            "n": len(measured[side]),
            "runs": measured[side],
            "summary": e2e.summarize_runs(measured[side]),
            "optimizer_stats": side_stats[side],
            "first_tokens": tokens[0][:16] if tokens else [],
        }
    if len(order) == 2:
        result["improvement"] = e2e.improvement(result["sides"]["baseline"], result["sides"]["attnforge"])
    return result


def run(
    model_name: str = "qwen3-0.6b",
    *,
    mode: str = "quick",
    runs: int | None = None,
    warmup: int = 1,
    all_scenarios: bool = False,
    progress: Callable[[str, int], None] | None = None,
    time_budget_s: float | None = None,
    kernels: str = "measured",
    **config_overrides,
) -> dict:
    """Run the scenarios of `mode` through mlx-lm and return the result document (what: "e2e-mlx").

    Without a Metal device only the agreement check runs (NO_METAL_NOTE). `kernels="all"` lets attnforge's
    MLX implementations run wherever they may (composed attention; the Metal kernel where verified).
    `doc["failure"]` is set when the attnforge side saw no attention call (the patch was not in effect).
    """
    if kernels not in KERNEL_POLICIES:
        raise ValueError(f"kernels={kernels!r} is not known; accepted: {KERNEL_POLICIES}")
    chosen = e2e.scenarios_for(mode, all_scenarios=all_scenarios)
    metal = on_metal()
    dtype = mx.bfloat16 if metal else mx.float32
    model, config = load(model_name, dtype=dtype, **config_overrides)
    order = ["baseline", "attnforge"] if (mode == "compare" or not metal) else ["attnforge"]
    runs = runs or (3 if mode != "full" else 5)
    if not metal:
        chosen, runs, warmup = chosen[:1], 1, 0
    was_patched, previous = integration.is_patched(), integration.get_mlx_settings()
    all_on = kernels == "all"
    integration.configure_mlx(composed=all_on, metal_kernels=all_on)
    doc = _new_doc(model_name, mode, metal, dtype, config, kernels, _method(metal, runs, warmup, order))
    started = time.monotonic()
    try:
        for scenario in chosen:
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                doc["skipped"].append(
                    {"name": scenario.name, "reason": f"time budget of {time_budget_s:g} s spent"}
                )
                continue
            if progress is not None:
                progress(scenario.name, len(chosen))
            sizes = (
                {} if metal else {"prompt_tokens": e2e.CPU_PROMPT_TOKENS, "new_tokens": e2e.CPU_NEW_TOKENS}
            )
            result = run_scenario(model, scenario, order, runs=runs, warmup=warmup,
                                  vocab_size=config["vocab_size"], **sizes)  # fmt: skip
            if not metal:
                for side in result["sides"].values():
                    side.pop("runs"), side.pop("summary")
                result.pop("improvement", None)
            doc["scenarios"].append(result)
    finally:
        integration.configure_mlx(**{name: getattr(previous, name) for name in ("composed", "metal_kernels")})
        (integration.patch_mlx_lm if was_patched else integration.unpatch_mlx_lm)()
    _finish(doc, metal)
    return doc


def _new_doc(model_name, mode, metal, dtype, config, kernels, method) -> dict:
    environment = report.run_environment()
    environment.update(mlx=package_version("mlx"), mlx_lm=package_version("mlx-lm"), mlx_device=device_name())
    return {
        "what": "e2e-mlx",
        "backend": "mlx",
        "model": model_name,
        "mode": mode if metal else f"{mode} (agreement check)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "tokenization": e2e.TOKENIZATION,
        "dtype": str(dtype).rsplit(".", 1)[-1],
        "architecture": {key: config.get(key) for key in e2e.ARCHITECTURE_FIELDS},
        "method": method,
        "kernel_policy": kernels,
        "note": None if metal else NO_METAL_NOTE,
        "scenarios": [],
        "skipped": [],
    }


def _finish(doc: dict, metal: bool) -> None:
    """The summary (e2e.summarize_scenarios) and the patch-in-effect check."""
    total = e2e.summarize_scenarios(doc, metal)
    if doc["scenarios"] and not total.get("calls"):
        doc["failure"] = (
            "attnforge's dispatch saw no attention call on the attnforge side: the patch was not in effect"
        )
    elif doc["scenarios"] and not total.get("optimized"):
        doc["baseline_only"] = BASELINE_NOTE


def _method(metal: bool, runs: int, warmup: int, order: list[str]) -> str:
    if not metal:
        return (
            f"{e2e.CPU_PROMPT_TOKENS}-token prompt, {e2e.CPU_NEW_TOKENS} greedy tokens (mlx-lm "
            "generate_step), unpatched and patched mlx-lm on one float32 model on MLX's CPU backend; "
            "tokens and dispatch statistics compared, nothing timed"
        )
    sides = " and ".join(order)
    return (
        "mlx-lm generate_step, greedy, EOS ignored, batch 1, bf16, KVCache; "
        f"{warmup} warm-up and {runs} measured runs per scenario of {sides}"
        + (", interleaved A B / B A in one process" if len(order) == 2 else "")
        + "; TTFT = time to the first new token (evaluated), decode tok/s = (new - 1) / time after it; "
        "median and 95% interval of the median; peak memory = mx.get_peak_memory per run"
    )


def markdown(doc: dict) -> str:
    """The result document as Markdown (agreement verdict without Metal, the timing table with it)."""
    env = doc["environment"]
    parts = [
        f"# End-to-end (mlx-lm): {doc['model']} ({doc['mode']})",
        "",
        f"- Device: {env.get('mlx_device')}; mlx {env.get('mlx')}, mlx-lm {env.get('mlx_lm')}; "
        f"commit {env.get('git_commit')}",
        f"- Created: {doc['created']}",
        f"- {report.SPEED_NOTE}",
        f"- Tokens: {doc['tokenization']}",
        f"- Method: {doc['method']}",
        f"- attnforge side: kernels={doc['kernel_policy']}",
        "",
    ]
    if "tokens_match" in doc:
        verdict = "identical" if doc["tokens_match"] else "DIFFERENT"
        parts.append(f"Greedy tokens of mlx-lm unpatched and patched by attnforge: {verdict}.")
    else:
        header = list(report.E2E_HEADER)
        rows = [
            [r["name"], r["prompt_tokens"], r["new_tokens"], side,
             *(_median(runs, metric) for metric in e2e.METRICS[:4]), _median(runs, "peak_mem_gib")]
            for r in doc["scenarios"] for side, runs in r["sides"].items()
        ]  # fmt: skip
        parts += ["Median over the measured runs.", "", report.markdown_table(header, rows)]
    counts = doc.get("optimizer_stats", {})
    parts += [
        "",
        f"attnforge side: {counts.get('calls', 0)} attention calls, {counts.get('optimized', 0)} by "
        f"attnforge's implementations; the others by reason: {counts.get('fallback_reasons', {})}",
    ]
    if doc.get("baseline_only"):
        parts += ["", doc["baseline_only"]]
    if doc.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in doc["skipped"])]
    if doc.get("failure"):
        parts += ["", f"**FAILED: {doc['failure']}**"]
    return "\n".join(parts) + "\n"


def _median(side: dict, metric: str) -> str:
    value = side.get("summary", {}).get(metric, {}).get("median")
    return "" if value is None else f"{value:.4g}"


def save(doc: dict, out_dir: Path | str, stem: str) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [report.write_json(doc, out / f"{stem}.json"), out / f"{stem}.md"]
    paths[1].write_text(markdown(doc))
    return paths


def device_name() -> str:
    """'cpu' on MLX's CPU backend, else the Metal device's name in lower case (e.g. 'apple-m2-max')."""
    if not on_metal():
        return "cpu"
    return str(mx.device_info().get("device_name", "metal")).lower().replace(" ", "-")


def results_dir(root: Path) -> Path:
    """`<root>/mlx-<device>`: mlx-cpu without Metal, e.g. mlx-apple-m2-max with it."""
    return root / f"mlx-{device_name()}"
