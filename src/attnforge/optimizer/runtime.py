"""Dispatch each attention call to the fastest verified implementation, and fall back to torch SDPA otherwise.

`AttentionOptimizer.should_optimize(cfg)` says whether an attnforge kernel would run for a call of that shape,
with a sentence saying why; `AttentionOptimizer.attention(q, k, v, ...)` runs the chosen implementation and
counts what it did. The default decision comes from the tuning table (kernels/tuning.py): a kernel runs only
where it was measured faster than torch SDPA on this GPU. Under TRITON_INTERPRET=1 (CPU) the kernels run for
correctness whenever they support the call, since speed is not the question there.

This module never imports transformers (DESIGN.md: integrations import the optimizer, not the reverse).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnforge.config import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    AttentionConfig,
    OptimizerSettings,
)
from attnforge.environment import triton_interpret, triton_status
from attnforge.kernels import reference

logger = logging.getLogger("attnforge.optimizer")

# Kernel kind -> (module, function); imported on first use so a missing or broken kernel only means fallback.
KERNEL_ENTRY_POINTS = {
    "decode": ("attnforge.kernels.decode", "decode_attention"),
    "prefill": ("attnforge.kernels.prefill", "prefill_attention"),
}
# Decisions are cached per call shape; the cache is cleared past this size (kv_len grows every decode step).
_DECISION_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Decision:
    """What the optimizer does with one kind of call.

    kernel: "decode" or "prefill" when an attnforge kernel runs, else None (torch SDPA).
    reason: a sentence for people; category: a short stable label, the key of the fallback statistics.
    group: the kind of call ("GQA-4:1 decode"), to report each distinct decision once.
    """

    kernel: str | None
    reason: str
    category: str
    group: str = ""  # the kind of call, e.g. "GQA-4:1 decode": decisions are logged once per group

    @property
    def optimized(self) -> bool:
        return self.kernel is not None


@dataclass(frozen=True)
class CallFeatures:
    """What a call needs beyond its shape: these decide which kernel can serve it."""

    causal: bool = True
    has_mask: bool = False
    has_q_lens: bool = False
    has_kv_lens: bool = False


@dataclass
class OptimizerStats:
    """Counts of attention calls, by outcome (calls replayed from a captured CUDA graph are not seen)."""

    calls: int = 0
    optimized: int = 0
    by_kernel: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def optimization_rate(self) -> float:
        """Fraction of calls that ran an attnforge kernel (0.0 before any call)."""
        return self.optimized / self.calls if self.calls else 0.0

    def record(self, decision: Decision) -> None:
        self.calls += 1
        if decision.optimized:
            self.optimized += 1
            self.by_kernel[decision.kernel] = self.by_kernel.get(decision.kernel, 0) + 1
        else:
            self.fallbacks[decision.category] = self.fallbacks.get(decision.category, 0) + 1

    def as_dict(self) -> dict:
        return {
            "calls": self.calls,
            "optimized": self.optimized,
            "fallbacks": sum(self.fallbacks.values()),
            "by_kernel": dict(self.by_kernel),
            "fallback_reasons": dict(self.fallbacks),
            "optimization_rate": self.optimization_rate,
        }


def _load_kernel(kind: str) -> tuple[Callable | None, str]:
    """The kernel function of `kind`, or None and why not."""
    module_name, function_name = KERNEL_ENTRY_POINTS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None, f"kernel not available: {module_name} is not part of this installation"
        return None, f"kernel not available: importing {module_name} failed ({error})"
    except Exception as error:  # noqa: BLE001 - a kernel module that fails to import must not break attention
        return None, f"kernel not available: importing {module_name} raised {type(error).__name__}: {error}"
    function = getattr(module, function_name, None)
    if function is None:
        return None, f"kernel not available: {module_name} has no {function_name}"
    return function, ""


def _shape_bucket(kind: str, cfg: AttentionConfig, features: CallFeatures | None = None) -> str | None:
    """The tuning-table bucket of this call, from the kernel module's `<kind>_bucket` function (whose
    parameters, by name, pick what it needs: sizes, dtype, and the lengths and masks the call carries)."""
    features = features or CallFeatures(causal=cfg.causal)
    module_name, _ = KERNEL_ENTRY_POINTS[kind]
    bucket_of = getattr(importlib.import_module(module_name), f"{kind}_bucket", None)
    if bucket_of is None:
        return None
    sizes = {
        "batch": cfg.batch_size, "kv_len": cfg.kv_len, "group": cfg.gqa_ratio, "q_len": cfg.seq_len,
        "head_dim": cfg.head_dim, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
        "causal": cfg.causal, "dtype": cfg.dtype, "has_mask": features.has_mask,
        "has_q_lens": features.has_q_lens, "has_kv_lens": features.has_kv_lens,
    }  # fmt: skip
    wanted = inspect.signature(bucket_of).parameters
    return bucket_of(**{name: sizes[name] for name in wanted if name in sizes})


def _measured_speedup(
    kind: str, cfg: AttentionConfig, device: torch.device, features: CallFeatures
) -> float | None:
    """Speed-up over torch SDPA measured for this call's bucket on this GPU (tuning table), or None."""
    try:
        tuning = importlib.import_module("attnforge.kernels.tuning")
        bucket = _shape_bucket(kind, cfg, features)
        speedup = None if bucket is None else tuning.measured_speedup(kind, tuning.gpu_key(device), bucket)
    except Exception as error:  # noqa: BLE001 - an unreadable table means "not measured", never a crash
        logger.warning("attnforge: tuning table lookup failed (%s: %s): treating as not measured",
                       type(error).__name__, error)  # fmt: skip
        return None
    return speedup


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def _kernel_kind(cfg: AttentionConfig, features: CallFeatures) -> str:
    """The decode kernel serves short causal queries without masks; everything else is prefill's."""
    single_query = cfg.seq_len == 1
    if cfg.phase == "decode" and (features.causal or single_query) and not features.has_mask:
        return "decode" if not features.has_q_lens else "prefill"
    return "prefill"


def _shape_label(cfg: AttentionConfig, kind: str) -> str:
    return f"{cfg.attention_pattern} {kind} (B={cfg.batch_size}, Lq={cfg.seq_len}, kv_len {cfg.kv_len})"


class AttentionOptimizer:
    """Chooses, per call, between attnforge's Triton kernels and torch SDPA, and keeps statistics.

    Args:
        settings: thresholds; default `OptimizerSettings()`.
        **overrides: fields of OptimizerSettings to change (e.g. `min_seq_len=1024`).
    """

    def __init__(self, settings: OptimizerSettings | None = None, **overrides) -> None:
        self._settings = settings or OptimizerSettings()
        self._stats = OptimizerStats()
        self._kernels: dict[str, tuple[Callable | None, str]] = {}
        self._triton: dict[str, tuple[bool, str]] = {}
        self._device_names: dict[torch.device, str] = {}
        self._decisions: dict[tuple, Decision] = {}
        self._failed: dict[tuple, str] = {}
        self._seen: dict[tuple, list] = {}
        _OPTIMIZERS[id(self)] = self
        if overrides:
            self.configure(**overrides)

    # ------------------------------------------------------------------------------------------------------
    # Settings and statistics

    @property
    def settings(self) -> OptimizerSettings:
        return self._settings

    def configure(self, **changes) -> OptimizerSettings:
        """Change settings (fields of OptimizerSettings); forgets cached decisions, keeps statistics."""
        accepted = [f.name for f in dataclasses.fields(OptimizerSettings)]
        for name in changes:
            if name not in accepted:
                raise ValueError(f"unknown setting {name!r}; accepted: {accepted}")
        self._settings = dataclasses.replace(self._settings, **changes)
        self._decisions.clear()
        self._seen.clear()
        return self._settings

    @property
    def stats(self) -> OptimizerStats:
        return self._stats

    def get_stats(self) -> dict:
        """calls, optimized, fallbacks, by_kernel, fallback_reasons, optimization_rate."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        """Zero the counters and forget which decisions were seen (so they are logged again)."""
        self._stats = OptimizerStats()
        self._seen.clear()

    def decisions(self) -> list[dict]:
        """Each distinct decision since the last reset: group, kernel, reason (first seen), calls."""
        return [
            {"group": d.group, "kernel": d.kernel or "torch SDPA", "reason": d.reason, "calls": calls}
            for d, calls in self._seen.values()
        ]

    def reset(self) -> None:
        """Forget statistics, cached decisions and remembered kernel failures."""
        self.reset_stats()
        self._decisions.clear()
        self._failed.clear()
        self._kernels.clear()

    # ------------------------------------------------------------------------------------------------------
    # Decisions

    def should_optimize(
        self,
        cfg: AttentionConfig,
        *,
        device: torch.device | str | None = None,
        features: CallFeatures | None = None,
    ) -> tuple[bool, str]:
        """Whether an attnforge kernel would run a call shaped like `cfg` on `device`, and why.

        Args:
            cfg: the call's shape (heads, head_dim, query and key/value lengths, dtype, causal).
            device: where the tensors live; default the CUDA GPU if present, else the CPU.
            features: masks and padded queries the call carries (default: none, causal per cfg).

        Returns:
            (True, "GQA-4:1 decode ...: attnforge decode kernel measured 1.9x faster ...") or (False, why).
        """
        device = torch.device(device) if device is not None else self._default_device()
        decision = self.decide(cfg, device, features or CallFeatures(causal=cfg.causal))
        return decision.optimized, decision.reason

    def decide(self, cfg: AttentionConfig, device: torch.device, features: CallFeatures) -> Decision:
        """The cached Decision for this call shape, features and device."""
        key = (cfg, device.type, device.index, features)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()
            decision = self._decide(cfg, device, features)
            self._decisions[key] = decision
        return decision

    def _decide(self, cfg: AttentionConfig, device: torch.device, features: CallFeatures) -> Decision:
        kind = _kernel_kind(cfg, features)
        label = _shape_label(cfg, kind)
        group = f"{cfg.attention_pattern} {kind} d{cfg.head_dim} {str(cfg.dtype)[6:]}"
        blocked = self._blocked_by_environment(kind, device, cfg, features) or self._blocked_by_settings(
            kind, cfg
        )
        if blocked is not None:
            category, why = blocked
            return Decision(None, f"{label}: {why}: falling back to torch SDPA", category, group)
        decision = self._decide_by_measurement(kind, cfg, device, features, label)
        return dataclasses.replace(decision, group=group)

    def _blocked_by_environment(
        self, kind: str, device: torch.device, cfg: AttentionConfig, features: CallFeatures
    ) -> tuple[str, str] | None:
        ok, why = self._triton_ok(device)
        if not ok:
            return "triton unavailable", why
        _, missing = self._kernel(kind)
        if missing:
            return "kernel not available", missing
        failure = self._failed.get((kind, cfg.dtype, features.has_mask, features.has_q_lens))
        if failure is not None:
            return "kernel raised", failure
        return None

    def _blocked_by_settings(self, kind: str, cfg: AttentionConfig) -> tuple[str, str] | None:
        s = self._settings
        if kind not in s.kernels:
            return "kernel disabled", f"the {kind} kernel is disabled (kernels={s.kernels})"
        if cfg.num_heads < s.min_heads:
            return "below min_heads", f"{cfg.num_heads} query heads < min_heads={s.min_heads}"
        if cfg.gqa_ratio < s.gqa_ratio_min:
            return "below gqa_ratio_min", f"GQA ratio {cfg.gqa_ratio} < gqa_ratio_min={s.gqa_ratio_min}"
        if s.min_seq_len is not None and cfg.kv_len < s.min_seq_len:
            return "below min_seq_len", f"kv_len {cfg.kv_len} < min_seq_len={s.min_seq_len}"
        if s.max_seq_len is not None and cfg.kv_len > s.max_seq_len:
            return "above max_seq_len", f"kv_len {cfg.kv_len} > max_seq_len={s.max_seq_len}"
        return None

    def _decide_by_measurement(
        self, kind: str, cfg: AttentionConfig, device: torch.device, features: CallFeatures, label: str
    ) -> Decision:
        if triton_interpret() and device.type != "cuda":
            why = f"TRITON_INTERPRET=1: running the attnforge {kind} kernel on {device.type} for correctness"
            return Decision(kind, f"{label}: {why} (no speed claim)", "interpreter")
        name = self._device_name(device)
        speedup = _measured_speedup(kind, cfg, device, features)
        if speedup is None:
            why = (
                f"no measurement of the attnforge {kind} kernel for this shape on {name} in the tuning table"
            )
            if not self._settings.require_measurement:
                return Decision(kind, f"{label}: {why}; running it (require_measurement=False)", "unmeasured")
            return Decision(None, f"{label}: {why}: falling back to torch SDPA", "not measured")
        if speedup < self._settings.min_speedup:
            why = f"attnforge {kind} kernel measured {speedup:.2f}x torch SDPA on {name}"
            rule = f"below min_speedup={self._settings.min_speedup:g}"
            return Decision(None, f"{label}: {why}, {rule}: falling back to torch SDPA", "slower than SDPA")
        why = f"attnforge {kind} kernel measured {speedup:.2f}x faster than torch SDPA on {name}"
        return Decision(kind, f"{label}: {why}", "measured faster")

    def _triton_ok(self, device: torch.device) -> tuple[bool, str]:
        key = device.type
        if key not in self._triton:
            self._triton[key] = triton_status(device)
        return self._triton[key]

    def _kernel(self, kind: str) -> tuple[Callable | None, str]:
        if not self._kernels:
            self._kernels.update({name: _load_kernel(name) for name in KERNEL_ENTRY_POINTS})
        return self._kernels[kind]

    def _device_name(self, device: torch.device) -> str:
        if device not in self._device_names:
            self._device_names[device] = _device_name(device)
        return self._device_names[device]

    @staticmethod
    def _default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ------------------------------------------------------------------------------------------------------
    # Running

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool = True,
        kv_lens: torch.Tensor | None = None,
        q_lens: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention with attnforge's semantics (DESIGN.md), by the chosen implementation.

        Args:
            q: `[B, Hq, Lq, D]`; k, v: `[B, Hkv, Lkv, D]` (Hq % Hkv == 0; any strides).
            scale: softmax scale, default 1/sqrt(D).
            causal: bottom-right aligned (query i sees keys `<= kv_lens[b] - Lq + i`).
            kv_lens: int `[B]`: keys at or beyond `kv_lens[b]` are ignored (static cache, padded batch).
            q_lens: int `[B]`: query rows at or beyond `q_lens[b]` are padding and come out as 0.
            attn_mask: bool (True = attend) or additive float mask broadcastable to `[B, Hq, Lq, Lkv]`,
                applied on top of `causal` and the lengths.

        Returns:
            `[B, Hq, Lq, Dv]` in q's dtype.
        """
        if q.shape[2] == 1 and q_lens is None:
            causal = False  # one query at the end sees every valid key: no mask, torch's fastest path too
        if _compiling():
            # Opaque to torch.compile: the choice is made when the graph runs, from the real sizes (dynamic
            # shapes included), and counted there; no graph break.
            return torch.ops.attnforge.optimized_attention(
                q, k, v, scale, causal, kv_lens, q_lens, attn_mask, id(self)
            )
        return self._attention_now(q, k, v, scale, causal, kv_lens, q_lens, attn_mask)

    def _attention_now(self, q, k, v, scale, causal, kv_lens, q_lens, attn_mask) -> torch.Tensor:
        """Decide from the tensors' sizes, count, run the kernel or torch SDPA."""
        flags = (causal, attn_mask is not None, q_lens is not None, kv_lens is not None)
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device.type, q.device.index)
        decision = self._decision_for_call(key + flags)
        self._note(decision)
        if decision.optimized:
            out = self._run_kernel(decision, q, k, v, scale, causal, kv_lens, q_lens, attn_mask, flags)
            if out is not None:
                return out
        return torch_fallback(q, k, v, scale, causal, kv_lens, q_lens, attn_mask)

    def _decision_for_call(self, key: tuple) -> Decision:
        """The cached Decision for a call: shapes, dtype, device, then (causal, has_mask, has_q_lens)."""
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()
            decision = self._decide_call(*key)
            self._decisions[key] = decision
        return decision

    def _decide_call(self, q_shape, k_shape, v_shape, dtype, device_type, device_index, *flags) -> Decision:
        unsupported = _unsupported_call(q_shape, k_shape, v_shape, dtype)
        if unsupported is not None:
            category = unsupported.split(":")[0]
            return Decision(None, f"{unsupported}: falling back to torch SDPA", category, category)
        batch, num_heads, q_len, head_dim = q_shape
        cfg = AttentionConfig(num_heads=num_heads, num_kv_heads=k_shape[1], head_dim=head_dim, seq_len=q_len,
                              batch_size=batch, kv_len=k_shape[2], dtype=dtype, causal=flags[0])  # fmt: skip
        return self.decide(cfg, torch.device(device_type, device_index), CallFeatures(*flags))

    def _run_kernel(self, decision, q, k, v, scale, causal, kv_lens, q_lens, attn_mask, features):
        """The kernel's output, or None after recording its failure (then the caller falls back)."""
        kind = decision.kernel
        function, _ = self._kernel(kind)
        if kv_lens is not None:
            kv_lens = kv_lens.to(device=q.device, dtype=torch.int32)
        try:
            if kind == "decode":
                return function(q, k, v, scale=scale, kv_lens=kv_lens)
            if q_lens is not None:
                q_lens = q_lens.to(device=q.device, dtype=torch.int32)
            return function(
                q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens, attn_mask=attn_mask
            )
        except Exception as error:  # noqa: BLE001 - any kernel failure means: fall back, remember, say why
            why = f"the attnforge {kind} kernel raised {type(error).__name__}: {error}"
            _, has_mask, has_q_lens, _ = features
            self._failed[(kind, q.dtype, has_mask, has_q_lens)] = why
            self._decisions.clear()
            logger.warning("%s; using torch SDPA for such calls from now on", why)
            self._stats.optimized -= 1
            self._stats.by_kernel[kind] -= 1
            if not self._stats.by_kernel[kind]:
                del self._stats.by_kernel[kind]
            self._stats.fallbacks["kernel raised"] = self._stats.fallbacks.get("kernel raised", 0) + 1
            return None

    def _note(self, decision: Decision) -> None:
        """Count a call and remember its decision."""
        self._stats.record(decision)
        self._remember(decision)[1] += 1

    def _remember(self, decision: Decision) -> list:
        """The [decision, calls] entry of this decision; with enable_debug, a new one is logged."""
        key = (decision.group, decision.kernel, decision.category)
        entry = self._seen.get(key)
        if entry is None:
            entry = self._seen[key] = [decision, 0]
            if self._settings.enable_debug:
                logger.info("attnforge dispatch: %s", decision.reason)
        return entry


def torch_fallback(
    q, k, v, scale=None, causal=True, kv_lens=None, q_lens=None, attn_mask=None
) -> torch.Tensor:
    """torch SDPA with attnforge's semantics, on the path torch runs fastest for the call.

    On CUDA, SDPA's `enable_gqa` with a mask runs the math backend (it materializes every logit), so masked
    GQA calls go as transformers sends them: one query token with its heads packed per key/value head (no
    copy of the cache), longer queries with K/V repeated. Returns `[B, Hq, Lq, Dv]`.
    """
    options = dict(scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens, attn_mask=attn_mask)
    masked = attn_mask is not None or kv_lens is not None or q_lens is not None
    masked = masked or (causal and q.shape[2] != k.shape[2])
    if q.device.type != "cuda" or q.shape[1] == k.shape[1] or not masked:
        return reference.sdpa(q, k, v, **options)
    shared_mask = attn_mask is None or (attn_mask.dim() == 4 and attn_mask.shape[1] == 1)
    if q.shape[2] == 1 and q_lens is None and shared_mask:
        return _packed_single_query(q, k, v, scale, kv_lens, attn_mask)
    return reference.sdpa(q, k, v, repeat_kv=True, **options)


def _packed_single_query(q, k, v, scale, kv_lens, attn_mask) -> torch.Tensor:
    """One query per head: the G query heads of a key/value head become G query rows of one MHA call."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    mask = reference.visibility_mask(batch, 1, kv_len, causal=False, kv_lens=kv_lens, device=q.device)
    if attn_mask is not None:
        attn_mask = attn_mask[:, :, -1:, :]
        if attn_mask.dtype == torch.bool:
            mask = attn_mask if mask is None else mask & attn_mask
        else:
            mask = (
                attn_mask.to(q.dtype) if mask is None else attn_mask.to(q.dtype).masked_fill(~mask, -math.inf)
            )
    if mask is not None:
        mask = mask.expand(batch, 1, group, kv_len)
    packed = q.reshape(batch, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        live = mask.any(-1, keepdim=True) if mask.dtype == torch.bool else torch.isfinite(mask).any(-1, True)
        out = out.masked_fill(~live, 0.0)
    return out.reshape(batch, num_heads, 1, v.shape[-1])


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _unsupported_call(q_shape, k_shape, v_shape, dtype) -> str | None:
    """Why attnforge's kernels cannot take a call of these shapes at all (None: they might)."""
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        return "not a 4-D call: tensors must be [B, H, L, D]"
    if k_shape[-1] != v_shape[-1]:
        return f"value head_dim differs: key head_dim {k_shape[-1]} != value head_dim {v_shape[-1]} (MLA)"
    if q_shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim unsupported: head_dim={q_shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype unsupported: dtype={dtype} is not one of {SUPPORTED_DTYPES}"
    if q_shape[0] != k_shape[0] or tuple(k_shape) != tuple(v_shape) or q_shape[-1] != k_shape[-1]:
        return f"shapes do not fit: q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}"
    return None


# Optimizers by id: the custom op below takes plain values only.
_OPTIMIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@torch.library.custom_op("attnforge::optimized_attention", mutates_args=())
def _optimized_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
    kv_lens: torch.Tensor | None, q_lens: torch.Tensor | None, attn_mask: torch.Tensor | None, optimizer: int,
) -> torch.Tensor:  # fmt: skip
    """`AttentionOptimizer.attention` as one op inside compiled graphs: `[B, Hq, Lq, Dv]`, contiguous."""
    out = _OPTIMIZERS[optimizer]._attention_now(q, k, v, scale, causal, kv_lens, q_lens, attn_mask)
    return out.contiguous()


@_optimized_attention_op.register_fake
def _(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, optimizer):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# The process-wide optimizer and the torch drop-in

_default_optimizer = AttentionOptimizer()


def get_optimizer() -> AttentionOptimizer:
    """The process-wide optimizer that `scaled_dot_product_attention` and the integrations use."""
    return _default_optimizer


def configure_optimizer(**settings) -> AttentionOptimizer:
    """Change the process-wide optimizer's settings (fields of OptimizerSettings) and return it.

    Example: `configure_optimizer(enable_debug=True, min_seq_len=1024, kernels=("decode",))`.
    Invalid values raise ValueError naming the value and the accepted range.
    """
    _default_optimizer.configure(**settings)
    if _default_optimizer.settings.enable_debug:
        _make_debug_visible()
    return _default_optimizer


def _make_debug_visible() -> None:
    """Show attnforge's decision log at INFO unless the application configured logging itself."""
    package_logger = logging.getLogger("attnforge")
    if package_logger.level == logging.NOTSET or package_logger.level > logging.INFO:
        package_logger.setLevel(logging.INFO)
    if not package_logger.handlers and not logging.getLogger().handlers:
        package_logger.addHandler(logging.StreamHandler())


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`, dispatched through the optimizer.

    Same arguments and semantics as torch's function, including its *top-left* `is_causal`: query i sees keys
    `<= i` whatever the key length. attnforge's own kernels are *bottom-right* aligned (query i sees keys
    `<= Lkv - Lq + i`, what a decode step against a cache needs); the two agree only when Lq == Lkv, so a
    top-left causal call with Lq != Lkv is passed on as an explicit mask. Calls attnforge cannot serve
    (dropout, not 4-D, Hq != Hkv without enable_gqa) go to torch unchanged. One difference: a query row that
    sees no key at all comes out as 0, where torch gives NaN.

    Args:
        query: `[B, Hq, Lq, D]`; key, value: `[B, Hkv, Lkv, D]`.
        attn_mask: bool (True = attend) or additive float mask broadcastable to `[B, Hq, Lq, Lkv]`.

    Returns:
        `[B, Hq, Lq, D]`.
    """
    torch_only = (
        dropout_p > 0.0
        or query.dim() != 4
        or key.dim() != 4
        or (query.shape[1] != key.shape[1] and not enable_gqa)
        or (is_causal and attn_mask is not None)  # torch itself rejects this combination
    )
    if torch_only:
        _default_optimizer._note(Decision(None, "passed to torch unchanged", "torch only", "torch only"))
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    causal = is_causal and query.shape[2] == key.shape[2]
    if is_causal and not causal:
        attn_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    return _default_optimizer.attention(query, key, value, scale=scale, causal=causal, attn_mask=attn_mask)
