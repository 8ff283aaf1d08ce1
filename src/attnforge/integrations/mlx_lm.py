"""mlx-lm integration: attnforge's dispatch inside mlx-lm's models, tested on MLX's CPU backend.

How mlx-lm calls attention: each model module binds `scaled_dot_product_attention` from
`mlx_lm.models.base` when it is imported (`from .base import ..., scaled_dot_product_attention`) and calls
`scaled_dot_product_attention(queries, keys, values, cache=cache, scale=..., mask=...)`. Base's function sends
a quantized cache (`hasattr(cache, "bits")`) to `quantized_scaled_dot_product_attention` and everything else
to `mx.fast.scaled_dot_product_attention`. Rebinding the name in base after a model module was imported
changes nothing for that module, so `patch_mlx_lm()` rebinds it in every loaded model module, and an import
hook (a meta-path finder for `mlx_lm.models.*`) does the same for model modules imported later.
`unpatch_mlx_lm()` puts the identical original function back everywhere and removes the hook.

Each call is decided by the policy shared with the torch side: one AttentionConfig ("GQA-3:1", phase), the
thresholds of `af.configure_optimizer(...)` (min_seq_len, max_seq_len, gqa_ratio_min, min_heads, kernels),
the optimizer's Decision and OptimizerStats types. What runs:
  - by default `mx.fast.scaled_dot_product_attention` (the baseline): attnforge has no measurement of a
    faster MLX implementation, and must never make a user slower;
  - `configure_mlx(composed=True)`: attnforge's GQA-aware composed attention where the thresholds allow;
  - `configure_mlx(metal_kernels=True)`: attnforge's Metal decode kernel for one-token calls, only with a
    Metal device, and only after it passed the protocol against the float64 oracle at first use. Without
    Metal the reason says "unverified: no Metal device" and the kernel never runs;
  - a quantized KV cache: mlx-lm's quantized attention, counted apart (`quantized_calls`).
Decisions are made, and counted, when MLX builds the graph: inside `mx.compile` that is once per trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from attnforge.config import SUPPORTED_HEAD_DIMS, AttentionConfig, OptimizerSettings
from attnforge.environment import package_version
from attnforge.integrations import MLX_INSTALL_HINT
from attnforge.integrations import mlx_attention as impl
from attnforge.integrations.mlx_models import (  # noqa: F401 - the conveniences are part of this API
    QUANT_RECIPES,
    build_model,
    convert,
    generate,
    load_gguf,
    make_cache,
    quantize,
)
from attnforge.optimizer import Decision, OptimizerStats, configure_optimizer, get_optimizer, policy

try:
    import mlx.core as mx
    from mlx_lm.models import base as mlx_base
except ImportError as error:  # pragma: no cover - exercised by hiding mlx in the tests
    raise ImportError(MLX_INSTALL_HINT) from error

logger = logging.getLogger("attnforge.integrations.mlx_lm")

MODEL_PACKAGE = "mlx_lm.models"
BASE_MODULE = "mlx_lm.models.base"
BASELINE = "mx.fast.scaled_dot_product_attention (baseline)"
# Decision.kernel -> the function of mlx_attention that runs it (looked up at call time).
IMPLEMENTATIONS = {"composed": "composed_attention", "metal-decode": "metal_decode_attention"}
_DECISION_CACHE_SIZE = 4096


@dataclass(frozen=True)
class MLXSettings:
    """Which of attnforge's MLX implementations may replace the baseline (mx.fast SDPA).

    The shared thresholds (`af.configure_optimizer(min_seq_len=..., ...)`) still apply to both.

    Args:
        composed: run attnforge's GQA-aware composed attention wherever the thresholds allow. No speed claim:
            nothing measured it faster than mx.fast SDPA; it is there to be measured and to be verified.
        metal_kernels: allow attnforge's Metal decode kernel for one-token calls. It runs only with a Metal
            device and after passing the float64-oracle protocol at first use; elsewhere it is reported as
            "unverified: no Metal device" and never runs.
    """

    composed: bool = False
    metal_kernels: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be True or False")


@dataclass
class _State:
    """Everything patching changed, so unpatching restores exactly what was there, plus dispatch state."""

    original: Callable | None = None  # mlx_lm.models.base.scaled_dot_product_attention, while patched
    bindings: dict[str, list[str]] = field(default_factory=dict)  # model module -> names rebound
    finder: _ModelModuleFinder | None = None
    settings: MLXSettings = field(default_factory=MLXSettings)
    stats: OptimizerStats = field(default_factory=OptimizerStats)
    quantized_calls: int = 0
    decisions: dict[tuple, Decision] = field(default_factory=dict)  # by AttentionConfig and features
    call_decisions: dict[tuple, Decision] = field(default_factory=dict)  # by the raw sizes of a call
    shared_settings: OptimizerSettings | None = None  # the thresholds call_decisions were made with
    seen: dict[tuple, list] = field(default_factory=dict)
    metal: dict[tuple, tuple[bool, str]] = field(default_factory=dict)  # verification per call kind


_STATE = _State()


# ----------------------------------------------------------------------------------------------------------
# Settings and statistics


def configure_mlx(**changes) -> MLXSettings:
    """Change the MLX settings (fields of MLXSettings), e.g. `configure_mlx(composed=True)`; returns them.

    Unknown names and non-bool values raise ValueError naming them and the accepted ones.
    """
    accepted = [f.name for f in dataclasses.fields(MLXSettings)]
    for name in changes:
        if name not in accepted:
            raise ValueError(f"unknown MLX setting {name!r}; accepted: {accepted}")
    _STATE.settings = dataclasses.replace(_STATE.settings, **changes)
    _STATE.decisions.clear()
    _STATE.call_decisions.clear()
    _STATE.seen.clear()
    return _STATE.settings


def get_mlx_settings() -> MLXSettings:
    """The MLX settings in force."""
    return _STATE.settings


def get_stats() -> dict:
    """calls, optimized, fallbacks, by_kernel, fallback_reasons, optimization_rate (as the torch side) and
    quantized_calls (calls with a quantized KV cache)."""
    return {**_STATE.stats.as_dict(), "quantized_calls": _STATE.quantized_calls}


def reset_stats() -> None:
    """Zero the MLX counters and forget which decisions were seen."""
    _STATE.stats = OptimizerStats()
    _STATE.quantized_calls = 0
    _STATE.seen.clear()


def reset() -> None:
    """Forget statistics, cached decisions and the Metal kernel's verification results."""
    reset_stats()
    _STATE.decisions.clear()
    _STATE.call_decisions.clear()
    _STATE.metal.clear()


def decisions() -> list[dict]:
    """Each distinct decision since the last reset: group, kernel, reason (first seen), calls."""
    return [
        {"group": d.group, "kernel": d.kernel or "mx.fast SDPA", "reason": d.reason, "calls": calls}
        for d, calls in _STATE.seen.values()
    ]


# ----------------------------------------------------------------------------------------------------------
# Decisions


def should_optimize(
    cfg: AttentionConfig, *, mask: str = "none", quantized: bool = False, sinks: bool = False
) -> tuple[bool, str]:
    """Whether attnforge would replace mx.fast SDPA for an MLX call shaped like `cfg`, and why.

    Args:
        cfg: the call's shape (heads, head_dim, query and key/value lengths, dtype).
        mask: "none", "causal" or "array": the mask mlx-lm passes.
        quantized: the KV cache is quantized (QuantizedKVCache); sinks: the call carries attention sinks.

    Returns:
        (False, "GQA-3:1 decode (...): no measurement of a faster MLX implementation on cpu: ...") by default.
    """
    decision = decide(cfg, mask=mask, quantized=quantized, sinks=sinks)
    return decision.optimized, decision.reason


def decide(
    cfg: AttentionConfig, *, mask: str = "none", quantized: bool = False, sinks: bool = False
) -> Decision:
    """The cached Decision for an MLX call (see `should_optimize`)."""
    if mask not in ("none", "causal", "array"):
        raise ValueError(f"mask={mask!r} is not one of ('none', 'causal', 'array')")
    key = (cfg, mask, quantized, sinks, get_optimizer().settings, _STATE.settings)
    decision = _STATE.decisions.get(key)
    if decision is None:
        if len(_STATE.decisions) >= _DECISION_CACHE_SIZE:
            _STATE.decisions.clear()
        decision = _decide(cfg, mask, quantized, sinks)
        _STATE.decisions[key] = decision
    return decision


def _decide(cfg: AttentionConfig, mask: str, quantized: bool, sinks: bool) -> Decision:
    label = f"{cfg.attention_pattern} {cfg.phase} (B={cfg.batch_size}, Lq={cfg.seq_len}, kv_len {cfg.kv_len})"
    group = f"{cfg.attention_pattern} {cfg.phase} d{cfg.head_dim} {str(cfg.dtype)[6:]}"
    if quantized:
        why = "quantized KV cache: mlx-lm's quantized attention"
        return Decision(None, f"{label}: {why}", "quantized KV cache", group)
    if sinks:
        return Decision(None, f"{label}: attention sinks: {BASELINE}", "attention sinks", group)
    blocked = _blocked_by_settings(cfg)
    if blocked is not None:
        category, why = blocked
        return Decision(None, f"{label}: {why}: {BASELINE}", category, group)
    settings = _STATE.settings
    metal_note = None
    if settings.metal_kernels and cfg.seq_len == 1 and mask == "none":
        verified, why = _metal_status(cfg)
        if verified:
            return Decision(
                "metal-decode", f"{label}: attnforge Metal decode kernel, {why}", "verified", group
            )
        metal_note = f"attnforge's Metal decode kernel is {why}"
    if settings.composed:
        why = "attnforge composed GQA attention (composed=True; no speed claim)"
        return Decision("composed", f"{label}: {why}" + (f"; {metal_note}" if metal_note else ""), "forced",
                        group)  # fmt: skip
    if metal_note is not None:
        category = "metal unverified" if "unverified" in metal_note else "metal failed verification"
        return Decision(None, f"{label}: {metal_note}: {BASELINE}", category, group)
    why = f"no measurement of a faster MLX implementation on {_device_name()}"
    return Decision(None, f"{label}: {why}: {BASELINE}", "not measured", group)


def _blocked_by_settings(cfg: AttentionConfig) -> tuple[str, str] | None:
    """The shared thresholds (the process-wide optimizer's settings), by the torch side's own rule."""
    return policy.blocked_by_settings(cfg.phase, cfg, get_optimizer().settings)


def _metal_status(cfg: AttentionConfig) -> tuple[bool, str]:
    """(verified, why) for the Metal decode kernel on calls like `cfg`; verified once per kind of call."""
    if not impl.metal_available():
        return False, "unverified: no Metal device"
    key = (cfg.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    if key not in _STATE.metal:
        _STATE.metal[key] = _verify_metal(cfg)
        logger.info("attnforge: Metal decode kernel for %s: %s", key, _STATE.metal[key][1])
    return _STATE.metal[key]


def _verify_metal(cfg: AttentionConfig) -> tuple[bool, str]:
    """The protocol on the kernel: float64 oracle; odd lengths up to 1000; random, needle, large logits."""
    reports = impl.check_mlx(
        impl.metal_decode_attention,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=impl.MLX_DTYPES[cfg.dtype],
        q_len=1,
    )
    failed = [report for report in reports if not report.passed]
    if failed:
        return (
            False,
            f"failed verification against the float64 oracle ({len(failed)}/{len(reports)} cases failed; "
            f"{failed[0]})",
        )
    worst = max(report.max_rel_l2 for report in reports)
    return (
        True,
        f"verified against the float64 oracle at first use ({len(reports)} cases, worst rel L2 {worst:.1e})",
    )


def _device_name() -> str:
    device = mx.default_device()
    if device.type == mx.gpu:
        return f"gpu ({mx.device_info().get('device_name', 'Metal')})"
    return "cpu"


def _call_decision(queries: mx.array, keys, mask, quantized: bool, sinks: bool) -> Decision:
    """Decision for one mlx-lm call, cached by its raw sizes (this runs once per layer per step)."""
    shared = get_optimizer().settings
    if shared is not _STATE.shared_settings:  # configure_optimizer(...) replaced them: decide afresh
        _STATE.shared_settings = shared
        _STATE.call_decisions.clear()
    kv_shape = (keys[0] if quantized else keys).shape  # quantized keys: (packed, scales, biases)
    kind = "none" if mask is None else ("causal" if isinstance(mask, str) else "array")
    key = (queries.shape, kv_shape[:3], queries.dtype, kind, quantized, sinks)
    decision = _STATE.call_decisions.get(key)
    if decision is None:
        if len(_STATE.call_decisions) >= _DECISION_CACHE_SIZE:
            _STATE.call_decisions.clear()
        decision = _STATE.call_decisions[key] = _decide_shapes(queries.shape, kv_shape, queries.dtype, kind,
                                                               quantized, sinks)  # fmt: skip
    return decision


def _decide_shapes(q_shape, kv_shape, dtype, mask: str, quantized: bool, sinks: bool) -> Decision:
    """The shapes as an AttentionConfig and its decision, or why attnforge cannot describe the call."""
    batch, num_heads, q_len, head_dim = q_shape
    unsupported = _unsupported(dtype, head_dim)
    if unsupported is not None:
        category, why = unsupported
        fallback = "mlx-lm's quantized attention" if quantized else BASELINE
        return Decision(None, f"{why}: {fallback}", category, category)
    cfg = AttentionConfig(num_heads=num_heads, num_kv_heads=kv_shape[1], head_dim=head_dim, seq_len=q_len,
                          batch_size=batch, kv_len=kv_shape[2], dtype=impl.TORCH_DTYPES[dtype],
                          causal=mask == "causal")  # fmt: skip
    return decide(cfg, mask=mask, quantized=quantized, sinks=sinks)


def _unsupported(dtype, head_dim: int) -> tuple[str, str] | None:
    if dtype not in impl.TORCH_DTYPES:
        return "dtype unsupported", f"dtype={dtype} is not one of {list(impl.TORCH_DTYPES)}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return "head_dim unsupported", f"head_dim={head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    return None


def _note(decision: Decision, quantized: bool) -> None:
    """Count a call, remember its decision; with enable_debug, log a new decision once."""
    _STATE.stats.record(decision)
    _STATE.quantized_calls += quantized
    key = (decision.group, decision.kernel, decision.category)
    entry = _STATE.seen.get(key)
    if entry is None:
        entry = _STATE.seen[key] = [decision, 0]
        if get_optimizer().settings.enable_debug:
            logger.info("attnforge mlx dispatch: %s", decision.reason)
    entry[1] += 1


# ----------------------------------------------------------------------------------------------------------
# The function patched into mlx-lm's model modules


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`, dispatched by attnforge (same arguments and results).

    Args:
        queries: `[B, Hq, L, D]`; keys, values: `[B, Hkv, S, D]`, or (packed, scales, biases) tuples when
            `cache` is quantized (has `bits`).
        cache: the layer's KV cache (or None); scale: softmax scale; mask: None, "causal" or an array;
        sinks: attention sinks (then mx.fast SDPA runs them).

    Returns:
        `[B, Hq, L, D]`.
    """
    quantized = hasattr(cache, "bits")
    decision = _call_decision(queries, keys, mask, quantized, sinks is not None)
    _note(decision, quantized)
    if decision.kernel is not None:
        return getattr(impl, IMPLEMENTATIONS[decision.kernel])(queries, keys, values, scale=scale, mask=mask)
    original = _STATE.original or mlx_base.scaled_dot_product_attention
    extra = {} if sinks is None else {"sinks": sinks}
    return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **extra)


# ----------------------------------------------------------------------------------------------------------
# Patching: every loaded model module, and an import hook for the ones imported later


class _PatchingLoader(importlib.abc.Loader):
    """Runs a model module's own loader, then rebinds its attention (if still patched)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if _STATE.original is not None:
            _patch_module(module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _ModelModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `mlx_lm.models.*` through the other finders and wraps the loader in `_PatchingLoader`."""

    def find_spec(self, fullname: str, path=None, target=None):
        if not fullname.startswith(MODEL_PACKAGE + ".") or fullname == BASE_MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def _patch_module(module) -> None:
    """Rebind every global of `module` that is mlx-lm's original function (whatever its name there)."""
    names = [name for name, value in vars(module).items() if value is _STATE.original]
    for name in names:
        setattr(module, name, scaled_dot_product_attention)
    if names:
        _STATE.bindings.setdefault(module.__name__, []).extend(names)


def _loaded_model_modules() -> list:
    prefix = MODEL_PACKAGE + "."
    return [
        module
        for name, module in list(sys.modules.items())
        if name.startswith(prefix) and name != BASE_MODULE and module is not None
    ]


def patch_mlx_lm(enable_debug: bool = False) -> int:
    """Route mlx-lm's attention through attnforge: every loaded model module now, later ones on import.

    Calling it twice is harmless. Code outside `mlx_lm.models` that bound base's function itself (a model's
    own `model_file`) is not patched.

    Args:
        enable_debug: log each new dispatch decision once (`configure_optimizer(enable_debug=True)`).

    Returns:
        the number of model modules patched so far (modules imported later are patched as they load).
    """
    if enable_debug:
        configure_optimizer(enable_debug=True)
    if _STATE.original is None:
        _STATE.original = mlx_base.scaled_dot_product_attention
        _STATE.finder = _ModelModuleFinder()
        sys.meta_path.insert(0, _STATE.finder)
    for module in _loaded_model_modules():
        _patch_module(module)
    return len(_STATE.bindings)


def unpatch_mlx_lm() -> None:
    """Undo `patch_mlx_lm`: every binding holds mlx-lm's original function again; the import hook is gone."""
    if _STATE.original is None:
        return
    for module_name, names in _STATE.bindings.items():
        module = sys.modules.get(module_name)
        for name in names:
            if module is not None and getattr(module, name, None) is scaled_dot_product_attention:
                setattr(module, name, _STATE.original)
    if _STATE.finder in sys.meta_path:
        sys.meta_path.remove(_STATE.finder)
    _STATE.bindings.clear()
    _STATE.finder = None
    _STATE.original = None


def is_patched() -> bool:
    """True while `patch_mlx_lm` is in effect."""
    return _STATE.original is not None


@contextlib.contextmanager
def optimized(*, enable_debug: bool = False) -> Iterator[None]:
    """`with af.mlx.optimized():` mlx-lm is patched inside the block (and left as it was found after)."""
    already = is_patched()
    patch_mlx_lm(enable_debug=enable_debug)
    try:
        yield
    finally:
        if not already:
            unpatch_mlx_lm()


def get_integration_status() -> dict:
    """is_patched, the patched model modules, the settings in force, Metal, statistics and versions."""
    settings = get_optimizer().settings
    return {
        "is_patched": is_patched(),
        "import_hook": _STATE.finder is not None and _STATE.finder in sys.meta_path,
        "patched_modules": sorted(_STATE.bindings),
        "mlx_settings": dataclasses.asdict(_STATE.settings),
        "thresholds": {
            name: getattr(settings, name)
            for name in ("min_seq_len", "max_seq_len", "gqa_ratio_min", "min_heads", "kernels")
        },  # fmt: skip
        "device": _device_name(),
        "metal_available": impl.metal_available(),
        "metal_kernel": _metal_summary(),
        "optimizer_stats": get_stats(),
        "decisions": decisions(),
        "mlx": package_version("mlx"),
        "mlx_lm": package_version("mlx-lm"),
    }


def _metal_summary() -> str:
    if not _STATE.settings.metal_kernels:
        return "disabled (metal_kernels=False)"
    if not impl.metal_available():
        return "unverified: no Metal device (it never runs here)"
    if not _STATE.metal:
        return "enabled; verified at first use against the float64 oracle"
    return "; ".join(f"{key}: {why}" for key, (_, why) in _STATE.metal.items())
