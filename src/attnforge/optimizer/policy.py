"""Which implementation serves an attention call, and why: a pure function of the call, the settings and what
the machine offers.

`decide(call, settings, machine)` turns a call (its AttentionConfig and CallFeatures) into a Decision with a
sentence saying why. What the machine offers (Triton, the kernel modules, the tuning store's entries, kernels
that failed before) comes in as a `Machine`, so the policy itself runs no kernel and touches no tensor: it is
testable with plain values. The runtime (runtime.py) caches decisions per shape bucket and carries them out.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from attnforge.config import (
    KERNEL_KINDS,
    MAX_DECODE_QUERY_LEN,
    AttentionConfig,
    OptimizerSettings,
    unsupported_by_kernels,
)

# Kernel kind -> (module, function); imported on first use so a missing or broken kernel only means fallback.
KERNEL_ENTRY_POINTS = {
    "decode": ("attnforge.kernels.decode", "decode_attention"),
    "prefill": ("attnforge.kernels.prefill", "prefill_attention"),
}


# Why a decode call outside a CUDA graph goes to torch even where the kernel is faster on the GPU
# (docs/notes/decode.md, "Eager generation"; benchmarks/results/h200/diag-hook/).
EAGER_DECODE = (
    "measured faster on the GPU, but outside a CUDA graph a decode step is bound by the host, and there the "
    "kernel's Triton launch costs more than torch SDPA's call (about 2x in place on an H200); it runs where "
    "calls are captured (attnforge accelerate, a static cache with torch.compile)"
)


class CallFeatures(NamedTuple):
    """What a call carries beyond its shape: these decide which kernel can serve it. (A named tuple: it is
    part of the key of every call's cached decision, and a tuple hashes without running Python code.)"""

    causal: bool = True
    has_mask: bool = False
    has_q_lens: bool = False
    has_kv_lens: bool = False
    captured: bool = False  # recorded into a CUDA graph: its launch costs no host time at replay


@dataclass(frozen=True)
class Decision:
    """What the optimizer does with one kind of call.

    kernel: "decode" or "prefill" when an attnforge kernel runs, else None (torch SDPA).
    reason: a sentence for people; category: a short stable label, the key of the fallback statistics.
    group: the kind of call ("GQA-4:1 decode d128 bfloat16"), to report each distinct decision once.
    origin: where a measurement came from ("this GPU", "architecture sm90 (measured on h100)", or "").
    """

    kernel: str | None
    reason: str
    category: str
    group: str = ""
    origin: str = ""

    @property
    def optimized(self) -> bool:
        return self.kernel is not None


@dataclass(frozen=True)
class Measurement:
    """A tuning-store entry as the policy needs it: the measured speed-up and where it was measured."""

    speedup: float | None
    origin: str  # "this GPU" or "architecture sm90 (measured on h100)"
    source: str = ""
    graph_speedup: float | None = None  # decode, per call inside a CUDA graph: what captured calls get


@dataclass
class Machine:
    """What this machine offers a call on one device; the runtime fills it in.

    triton: (usable, why). missing: kernel kind -> why it cannot be imported. interpreter: Triton runs on
    the CPU (correctness only). device_name: for reasons. failed: (kind, dtype, has_mask, has_q_lens) -> why
    a kernel raised before. measure(kind, bucket, architecture) -> Measurement or None.
    """

    triton: tuple[bool, str]
    device_name: str
    interpreter: bool = False
    missing: Mapping[str, str] = field(default_factory=dict)
    failed: Mapping[tuple, str] = field(default_factory=dict)
    measure: Callable[[str, str, bool], Measurement | None] = lambda kind, bucket, architecture: None


def kernel_kind(cfg: AttentionConfig, features: CallFeatures) -> str:
    """The decode kernel serves short causal queries without masks or padded queries; prefill the rest."""
    single_query = cfg.seq_len == 1
    if cfg.phase == "decode" and (features.causal or single_query) and not features.has_mask:
        return "prefill" if features.has_q_lens else "decode"
    return "prefill"


def bucket(kind: str, cfg: AttentionConfig, features: CallFeatures) -> str | None:
    """The tuning-store bucket of this call, from the kernel module's `<kind>_bucket` function (whose
    parameters, by name, pick what it needs: sizes, dtype, and the lengths and masks the call carries)."""
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


def size_class(n: int) -> int:
    """Power-of-two class of a length: every bucket of the kernels is a union of these classes."""
    return (max(n, 1) - 1).bit_length()


def decision_key(q_shape, k_shape, v_shape, dtype, device, features: CallFeatures, settings) -> tuple:
    """What a decision depends on, coarse enough that a growing cache keeps hitting the same cached decision:
    exact batch, heads, head_dim and decode lengths; power-of-two classes of longer lengths (the buckets are
    unions of them); and which side of the length thresholds the call falls."""
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        return (tuple(q_shape), tuple(k_shape), tuple(v_shape), dtype, device, features)
    batch, num_heads, q_len, head_dim = q_shape
    kv_len = k_shape[2]
    q_class = q_len if q_len <= MAX_DECODE_QUERY_LEN else -size_class(q_len)
    above_min = settings.min_seq_len is None or kv_len >= settings.min_seq_len
    below_max = settings.max_seq_len is None or kv_len <= settings.max_seq_len
    return (batch, num_heads, q_class, head_dim, k_shape[1], size_class(kv_len), v_shape[-1], q_len < kv_len,
            dtype, device, features, above_min, below_max)  # fmt: skip


def decide(
    cfg: AttentionConfig, features: CallFeatures, settings: OptimizerSettings, machine: Machine
) -> Decision:
    """The decision for a call shaped like `cfg` carrying `features`, with the reason in one sentence."""
    unsupported = unsupported_by_kernels(cfg.head_dim, cfg.dtype)
    if unsupported is not None:
        category = unsupported.split(":")[0]
        return Decision(None, f"{unsupported}: falling back to torch SDPA", category, category)
    kind = kernel_kind(cfg, features)
    shape_bucket = bucket(kind, cfg, features) if kind not in machine.missing else None
    label = f"{cfg.attention_pattern} {kind} ({shape_bucket or _shape_text(cfg)})"
    group = f"{cfg.attention_pattern} {kind} d{cfg.head_dim} {str(cfg.dtype)[6:]}"
    blocked = _blocked_by_machine(kind, cfg, features, machine) or blocked_by_settings(kind, cfg, settings)
    if blocked is not None:
        category, why = blocked
        return Decision(None, f"{label}: {why}: falling back to torch SDPA", category, group)
    if machine.interpreter:
        why = f"TRITON_INTERPRET=1: running the attnforge {kind} kernel on the CPU for correctness"
        return Decision(kind, f"{label}: {why} (no speed claim)", "interpreter", group)
    measured = None
    if shape_bucket is not None:
        measured = machine.measure(kind, shape_bucket, settings.architecture_entries)
    return _decide_by_measurement(kind, label, group, measured, settings, machine.device_name, features)


def unsupported_call(q_shape, k_shape, v_shape, dtype) -> str | None:
    """Why attnforge's kernels cannot take a call of these shapes at all (None: they might)."""
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        return "not a 4-D call: tensors must be [B, H, L, D]"
    if k_shape[-1] != v_shape[-1]:
        return f"value head_dim differs: key head_dim {k_shape[-1]} != value head_dim {v_shape[-1]} (MLA)"
    unsupported = unsupported_by_kernels(q_shape[-1], dtype)
    if unsupported is not None:
        return unsupported
    if q_shape[0] != k_shape[0] or tuple(k_shape) != tuple(v_shape) or q_shape[-1] != k_shape[-1]:
        return f"shapes do not fit: q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}"
    if q_shape[1] % k_shape[1]:
        return f"heads do not group: {q_shape[1]} query heads, {k_shape[1]} key/value heads"
    if q_shape[2] > k_shape[2]:
        return f"more queries than keys: q_len {q_shape[2]} > kv_len {k_shape[2]}"
    return None


def _shape_text(cfg: AttentionConfig) -> str:
    return f"B={cfg.batch_size}, Lq={cfg.seq_len}, kv_len {cfg.kv_len}"


def _blocked_by_machine(kind, cfg, features, machine: Machine) -> tuple[str, str] | None:
    usable, why = machine.triton
    if not usable:
        return "triton unavailable", why
    if kind in machine.missing:
        return "kernel not available", machine.missing[kind]
    failure = machine.failed.get((kind, cfg.dtype, features.has_mask, features.has_q_lens))
    if failure is not None:
        return "kernel raised", failure
    return None


def blocked_by_settings(kind: str, cfg: AttentionConfig, s: OptimizerSettings) -> tuple[str, str] | None:
    """(category, why) when a threshold of the settings keeps `kind`'s attnforge implementation from a call
    shaped like `cfg`, else None. Shared by every backend (torch, MLX), so reasons read the same."""
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
    kind, label, group, measured: Measurement | None, settings, device_name, features: CallFeatures
) -> Decision:
    if measured is None or measured.speedup is None:
        why = f"no measurement of the attnforge {kind} kernel for this bucket on {device_name}"
        why += " or another GPU of its architecture"
        if not settings.require_measurement:
            why += "; running it (require_measurement=False)"
            return Decision(kind, f"{label}: {why}", "unmeasured", group)
        return Decision(None, f"{label}: {why}: falling back to torch SDPA", "not measured", group)
    where = f"{device_name}, {measured.origin}" + (f": {measured.source}" if measured.source else "")
    speedup, how = measured.speedup, ""
    if kind == "decode" and features.captured and measured.graph_speedup is not None:
        speedup, how = measured.graph_speedup, " per call in CUDA graphs"
    if speedup < settings.min_speedup:
        why = f"attnforge {kind} kernel measured {speedup:.2f}x torch SDPA{how} ({where})"
        rule = f"below min_speedup={settings.min_speedup:g}"
        reason = f"{label}: {why}, {rule}: falling back to torch SDPA"
        return Decision(None, reason, "slower than SDPA", group, measured.origin)
    if kind == "decode" and not features.captured:
        reason = f"{label}: {EAGER_DECODE}: falling back to torch SDPA"
        return Decision(None, reason, "eager decode", group, measured.origin)
    why = f"attnforge {kind} kernel measured {speedup:.2f}x faster than torch SDPA{how} ({where})"
    return Decision(kind, f"{label}: {why}", "measured faster", group, measured.origin)


__all__ = [
    "KERNEL_KINDS",
    "KERNEL_ENTRY_POINTS",
    "CallFeatures",
    "Decision",
    "Machine",
    "Measurement",
    "blocked_by_settings",
    "bucket",
    "decide",
    "decision_key",
    "kernel_kind",
    "size_class",
    "unsupported_call",
]
