"""Carry out the policy's decisions: run attnforge's kernel or torch SDPA per call, and count what happened.

`AttentionOptimizer.attention(q, k, v, ...)` looks up the decision for the call's shape bucket (cached, so a
growing cache costs a dictionary lookup per call, not a new decision), runs the kernel or torch SDPA, and
records the outcome. A kernel that raises is remembered and never retried; the call falls back at once.
Inside `torch.compile` the choice is made when the graph runs, through one custom op (no graph break).

This module never imports transformers (DESIGN.md: integrations import the optimizer, not the reverse).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnforge.config import MAX_DECODE_QUERY_LEN, AttentionConfig, OptimizerSettings
from attnforge.environment import triton_interpret, triton_status
from attnforge.kernels import reference, temporary_workspaces
from attnforge.optimizer import policy
from attnforge.optimizer.policy import CallFeatures, Decision, Machine, Measurement
from attnforge.optimizer.stats import OptimizerStats

logger = logging.getLogger("attnforge.optimizer")
# Cached decisions are dropped past this many keys (each key covers a whole bucket of shapes).
_DECISION_CACHE_SIZE = 4096
# Exact call shapes remembered in front of the bucket cache (a decode step's layers share one).
_RECENT_SHAPES = 64
# Every CallFeatures value, by (causal, has_mask, has_q_lens, has_kv_lens): no construction per call.
_FEATURES = {flags: CallFeatures(*flags) for flags in itertools.product((False, True), repeat=5)}


def load_kernel(kind: str) -> tuple[Callable | None, str]:
    """The kernel function of `kind`, or None and why not."""
    module_name, function_name = policy.KERNEL_ENTRY_POINTS[kind]
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


def measure(device: torch.device) -> Callable[[str, str, bool], Measurement | None]:
    """The tuning store's answer for `device`: (kind, bucket, architecture) -> Measurement or None."""

    def lookup(kind: str, bucket: str, architecture: bool) -> Measurement | None:
        try:
            from attnforge.kernels import tuning

            entry = tuning.lookup(kind, device, bucket, architecture=architecture)
        except Exception as error:  # noqa: BLE001 - an unreadable table means "not measured", never a crash
            logger.warning("attnforge: tuning store lookup failed (%s: %s): treating as not measured",
                           type(error).__name__, error)  # fmt: skip
            return None
        if entry is None:
            return None
        return Measurement(entry.speedup, entry.origin, entry.source, entry.graph_speedup)

    return lookup


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def machine_for(device: torch.device, kernels: dict, failed: dict) -> Machine:
    """What `device` offers the policy: Triton, the kernel modules, the tuning store, earlier failures."""
    missing = {kind: why for kind, (function, why) in kernels.items() if function is None}
    return Machine(
        triton=triton_status(device),
        device_name=device_name(device),
        interpreter=triton_interpret() and device.type != "cuda",
        missing=missing,
        failed=failed,
        measure=measure(device),
    )


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
        self._machines: dict[torch.device, Machine] = {}
        self._decisions: dict[tuple, Decision] = {}
        self._recent: dict[tuple, Decision] = {}
        self._failed: dict[tuple, str] = {}
        self._logged: set[tuple] = set()
        self._replacements: dict[str, tuple[Callable, str]] = {}
        # Bumped whenever cached decisions or the statistics are dropped: whoever keeps a decision or a
        # `tally` entry compares it (a plain attribute, read on the hot path).
        self.epoch = 0
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
        self.forget_decisions()
        self._logged.clear()
        return self._settings

    @property
    def stats(self) -> OptimizerStats:
        return self._stats

    def get_stats(self) -> dict:
        """calls, optimized, fallbacks, by_kernel, fallback_reasons, input_copies, optimization_rate."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        """Zero the counters and forget which decisions were seen (so they are logged again)."""
        self._stats = OptimizerStats()
        self._logged.clear()
        self.epoch += 1  # entries handed out by `tally` are no longer the live ones

    def decisions(self) -> list[dict]:
        """Each distinct decision since the last reset: group, kernel, reason (first seen), calls."""
        kinds: dict[tuple, list] = {}
        for decision, calls in self._stats.by_decision.values():
            key = (decision.group, decision.kernel, decision.category)
            kinds.setdefault(key, [decision, 0])[1] += calls
        return [
            {"group": d.group, "kernel": d.kernel or "torch SDPA", "reason": d.reason, "calls": calls}
            for d, calls in kinds.values()
        ]

    def forget_decisions(self) -> None:
        """Drop cached decisions (after the tuning store or the machine changed); keeps statistics."""
        self._decisions.clear()
        self._recent.clear()
        self._machines.clear()
        self.epoch += 1

    def use_kernel(self, kind: str, function: Callable | None, label: str = "") -> None:
        """Run `function` wherever the policy chooses attnforge's `kind` kernel (None: attnforge's own again).

        For a kernel already verified on this machine (`load_and_patch_model(..., evolved_program=)` runs the
        evolve evaluator's correctness stages first); it takes the kernel's keyword arguments. Decisions say
        `label`. Kept across `reset()`.
        """
        if kind not in policy.KERNEL_ENTRY_POINTS:
            raise ValueError(f"kind={kind!r} is not one of {tuple(policy.KERNEL_ENTRY_POINTS)}")
        if function is None:
            self._replacements.pop(kind, None)
        elif not callable(function):
            raise TypeError(f"function must be callable or None, got {type(function).__name__}")
        else:
            self._replacements[kind] = (function, label or getattr(function, "__name__", "external"))
        self._kernels.clear()
        self._failed.clear()
        self.forget_decisions()

    def replaced_kernels(self) -> dict[str, str]:
        """Kernel kind -> label of the external kernel that serves it (see `use_kernel`)."""
        return {kind: label for kind, (_, label) in self._replacements.items()}

    def reset(self) -> None:
        """Forget statistics, cached decisions and remembered kernel failures."""
        self.reset_stats()
        self.forget_decisions()
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
            (True, "GQA-4:1 decode (d128-m4-b1-kv4k): attnforge decode kernel measured 1.25x faster ...")
            or (False, why).
        """
        device = torch.device(device) if device is not None else _default_device()
        decision = self.decide(cfg, device, features or CallFeatures(causal=cfg.causal))
        return decision.optimized, decision.reason

    def decide(self, cfg: AttentionConfig, device: torch.device, features: CallFeatures) -> Decision:
        """The Decision for a call shaped like `cfg` (uncached: the hot path uses `decision_for`)."""
        decision = policy.decide(cfg, features, self._settings, self._machine(device))
        if decision.kernel in self._replacements:
            label = self._replacements[decision.kernel][1]
            why = f"{decision.reason}; running {label} in its place (verified on this machine)"
            decision = dataclasses.replace(decision, reason=why)
        return decision

    def decision_for(self, q_shape, k_shape, v_shape, dtype, device, features: CallFeatures) -> Decision:
        """The cached Decision for a call with these shapes: the exact shapes seen last (every layer of a
        decode step), else their shape bucket (a growing cache), else a new decision."""
        exact = (q_shape, k_shape, v_shape, dtype, device, features)
        decision = self._recent.get(exact)
        if decision is not None:
            return decision
        key = policy.decision_key(q_shape, k_shape, v_shape, dtype, device, features, self._settings)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()
            decision = self._decide_call(q_shape, k_shape, v_shape, dtype, device, features)
            self._decisions[key] = decision
        if len(self._recent) >= _RECENT_SHAPES:
            self._recent.clear()
        self._recent[exact] = decision
        return decision

    def _decide_call(self, q_shape, k_shape, v_shape, dtype, device, features) -> Decision:
        unsupported = policy.unsupported_call(q_shape, k_shape, v_shape, dtype)
        if unsupported is not None:
            category = unsupported.split(":")[0]
            return Decision(None, f"{unsupported}: falling back to torch SDPA", category, category)
        batch, num_heads, q_len, head_dim = q_shape
        cfg = AttentionConfig(
            num_heads=num_heads, num_kv_heads=k_shape[1], head_dim=head_dim, seq_len=q_len,
            batch_size=batch, kv_len=k_shape[2], dtype=dtype, causal=features.causal,
        )  # fmt: skip
        return self.decide(cfg, device, features)

    def _machine(self, device: torch.device) -> Machine:
        machine = self._machines.get(device)
        if machine is None:
            if not self._kernels:
                self._kernels.update({kind: load_kernel(kind) for kind in policy.KERNEL_ENTRY_POINTS})
                self._kernels.update({kind: (fn, "") for kind, (fn, _) in self._replacements.items()})
            machine = self._machines[device] = machine_for(device, self._kernels, self._failed)
        return machine

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
        kv_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention with attnforge's semantics (DESIGN.md), by the chosen implementation.

        Args:
            q: `[B, Hq, Lq, D]`; k, v: `[B, Hkv, Lkv, D]` (Hq % Hkv == 0; any strides).
            scale: softmax scale, default 1/sqrt(D).
            causal: bottom-right aligned (query i sees keys `<= kv_lens[b] - Lq + i`).
            kv_lens: int `[B]`: keys at or beyond `kv_lens[b]` are ignored (static cache, padded batch). The
                kernels never read them; torch's masked path (the fallback) multiplies them by 0, so there
                they must be finite (transformers' caches hold zeros).
            q_lens: int `[B]`: query rows at or beyond `q_lens[b]` are padding and come out as 0.
            attn_mask: bool (True = attend) or additive float mask broadcastable to `[B, Hq, Lq, Lkv]`,
                applied on top of `causal` and the lengths.
            kv_starts: int `[B]`: the first valid key per sequence (a left-padded batch); keys before it are
                ignored. The decode kernel reads from there; every other path gets it as a mask.

        Returns:
            `[B, Hq, Lq, Dv]` in q's dtype.
        """
        if q.shape[2] == 1 and q_lens is None:
            causal = False  # one query at the end sees every valid key: no mask, torch's fastest path too
        if torch.compiler.is_compiling():
            # Opaque to torch.compile: the choice is made when the graph runs, from the real sizes (dynamic
            # shapes included), and counted there; no graph break.
            return torch.ops.attnforge.optimized_attention(
                q, k, v, scale, causal, kv_lens, q_lens, attn_mask, kv_starts, id(self)
            )
        return self.attention_now(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, kv_starts)

    def attention_now(
        self, q, k, v, scale, causal, kv_lens, q_lens, attn_mask, kv_starts=None
    ) -> torch.Tensor:
        """Decide from the tensors' sizes, run the kernel or torch SDPA, count the outcome."""
        if kv_starts is not None and not _decode_shaped(q, q_lens, attn_mask):
            attn_mask, kv_starts = starts_as_mask(kv_starts, k.shape[2], attn_mask), None
        out = self.run_kernel_if_chosen(q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens,
                                        attn_mask=attn_mask, kv_starts=kv_starts)  # fmt: skip
        if out is not None:
            return out
        attn_mask = attn_mask if kv_starts is None else starts_as_mask(kv_starts, k.shape[2], attn_mask)
        return torch_fallback(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, stats=self._stats)

    def run_kernel_if_chosen(
        self, q, k, v, *, scale=None, causal=True, kv_lens=None, q_lens=None, attn_mask=None, kv_starts=None
    ) -> torch.Tensor | None:
        """The kernel's output if the decision for this call is a kernel and it ran; else None, and the caller
        runs torch. Either way the call is counted once, under what actually ran. `kv_starts` (decode-shaped
        calls without a mask only) goes to the decode kernel as it is, to the prefill kernel as a mask."""
        captured = q.is_cuda and torch.cuda.is_current_stream_capturing()  # EAGER_DECODE
        flags = (causal, attn_mask is not None, q_lens is not None, kv_lens is not None, captured)
        features = _FEATURES[flags]
        exact = (q.shape, k.shape, v.shape, q.dtype, q.device, features)
        decision = self._recent.get(exact) or self.decision_for(*exact)  # the hit inline: every call pays it
        if decision.kernel is None:
            self.note(decision)
            return None
        if kv_starts is not None and decision.kernel != "decode":
            attn_mask, kv_starts = starts_as_mask(kv_starts, k.shape[2], attn_mask), None
        lengths = (kv_lens, q_lens, kv_starts)
        out = self._run_kernel(decision, q, k, v, scale, causal, lengths, attn_mask, features)
        # After a failure the kernel's decisions were dropped: count the call under the new one (torch).
        self.note(decision if out is not None else self.decision_for(*exact))
        return out

    def _run_kernel(self, decision, q, k, v, scale, causal, lengths, attn_mask, features):
        """The kernel's output, or None after remembering its failure (then the caller falls back).
        lengths: (kv_lens, q_lens, kv_starts), each None or int `[B]`."""
        kind = decision.kernel
        function, _ = self._kernels[kind]
        kv_lens, q_lens, kv_starts = [_as_lengths(lens, q.device) for lens in lengths]
        try:
            if kind == "decode":
                starts = {} if kv_starts is None else {"kv_starts": kv_starts}
                return function(q, k, v, scale=scale, kv_lens=kv_lens, **starts)
            return function(
                q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens, attn_mask=attn_mask
            )
        except Exception as error:  # noqa: BLE001 - any kernel failure means: fall back, remember, say why
            self._remember_failure(kind, q.dtype, features, error)
            return None

    def prepared_decode(self, query: torch.Size, key: torch.Size, dtype: torch.dtype, device: torch.device):
        """The built-in decode kernel prepared for a plan's calls (`kernels.decode.prepared_decode`: shapes,
        dtype and device fixed for a forward, no per-call checks or lookups); None where an external kernel
        serves decode calls (`use_kernel`) or the preparation fails (then calls take `run_planned_decode`)."""
        if "decode" in self._replacements:
            return None
        try:
            from attnforge.kernels.decode import prepared_decode

            return prepared_decode(query, key, dtype, device)
        except Exception:  # noqa: BLE001 - the general call path reports what fails
            return None

    def run_planned_decode(self, q, k, v, scale, prepared=None) -> torch.Tensor | None:
        """The decode kernel's output `[B, Hq, 1, D]` for a decode call without lengths or mask that the
        caller matched to a decode decision of `decision_for` (the caller counts it), through `prepared` (from
        `prepared_decode`) when given; None after remembering a failure, as `run_kernel_if_chosen` does (then
        the caller takes the general path)."""
        try:
            if prepared is not None:
                return prepared(q, k, v, scale)
            return self._kernels["decode"][0](q, k, v, scale=scale, kv_lens=None)
        except Exception as error:  # noqa: BLE001 - as in _run_kernel
            self._remember_failure("decode", q.dtype, _FEATURES[(False, False, False, False, False)], error)
            return None

    def _remember_failure(self, kind: str, dtype, features: CallFeatures, error: Exception) -> None:
        """Such calls go to torch from now on (their cached decisions dropped); the reason is logged once."""
        why = f"the attnforge {kind} kernel raised {type(error).__name__}: {error}"
        self._failed[(kind, dtype, features.has_mask, features.has_q_lens)] = why
        self._decisions.clear()
        self._recent.clear()
        self.epoch += 1
        logger.warning("%s; using torch SDPA for such calls from now on", why)

    def tally(self, decision: Decision) -> list:
        """Count one call as `note` does and return the live `[decision, calls]` entry of the statistics: a
        caller serving many calls of one decision adds to `entry[1]` itself while `epoch` is unchanged."""
        self.note(decision)
        return self._stats.by_decision[id(decision)]

    def note(self, decision: Decision) -> None:
        """Count one call carried out as `decision` says (and log a kind of decision the first time)."""
        if self._stats.record(decision) and self._settings.enable_debug:
            key = (decision.group, decision.kernel, decision.category)
            if key not in self._logged:
                self._logged.add(key)
                logger.info("attnforge dispatch: %s", decision.reason)


def _decode_shaped(q: torch.Tensor, q_lens, attn_mask) -> bool:
    """A call the decode kernel could take with kv_starts: few new tokens, no padded queries, no mask."""
    return q.shape[2] <= MAX_DECODE_QUERY_LEN and q_lens is None and attn_mask is None


def _as_lengths(lens: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Lengths as the kernels take them: on q's device, int32 or int64 kept as they are (a cast to int32
    here would wrap large int64 values before the kernel clamps them), other integer types as int64."""
    if lens is None:
        return None
    if lens.dtype not in (torch.int32, torch.int64):
        lens = lens.long()
    return lens.to(device)


def starts_as_mask(kv_starts: torch.Tensor, kv_len: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """`attn_mask` with the keys before `kv_starts[b]` masked out (bool `[B, 1, 1, Lkv]` if it was None)."""
    starts = kv_starts.to(attn_mask.device if attn_mask is not None else kv_starts.device)
    keys_valid = (torch.arange(kv_len, device=starts.device)[None, :] >= starts[:, None])[:, None, None, :]
    if attn_mask is None:
        return keys_valid
    if attn_mask.dtype == torch.bool:
        return attn_mask & keys_valid
    return attn_mask.masked_fill(~keys_valid, float("-inf"))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_fallback(
    q, k, v, scale=None, causal=True, kv_lens=None, q_lens=None, attn_mask=None, *, stats=None
) -> torch.Tensor:
    """torch SDPA with attnforge's semantics (enable_gqa: the cache is never repeated), `[B, Hq, Lq, Dv]`.

    Measured with torch 2.11 on an H200 (benchmarks/results/h200/tuning-decode-lens-20261127.md): a masked
    GQA call with enable_gqa took 59 us where repeating K/V (transformers' path) took 703 us and packing the
    query heads per KV head 727 us. Inputs torch's fused kernels cannot take as they are (unaligned views)
    are copied first, counted in `stats.input_copies`.
    """
    q, k, v = reference.fused_sdpa_safe(q, k, v, on_copy=None if stats is None else stats.record_copy)
    return reference.sdpa(
        q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens, attn_mask=attn_mask
    )


# Optimizers by id: the custom op below takes plain values only.
_OPTIMIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@torch.library.custom_op("attnforge::optimized_attention", mutates_args=())
def _optimized_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
    kv_lens: torch.Tensor | None, q_lens: torch.Tensor | None, attn_mask: torch.Tensor | None,
    kv_starts: torch.Tensor | None, optimizer: int,
) -> torch.Tensor:  # fmt: skip
    """`AttentionOptimizer.attention` as one op inside compiled graphs: `[B, Hq, Lq, Dv]`, contiguous."""
    run = _OPTIMIZERS[optimizer].attention_now
    with temporary_workspaces():  # what a compiled graph allocates must not outlive the call
        out = run(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, kv_starts)
    return out.contiguous()


@_optimized_attention_op.register_fake
def _(q, k, v, scale, causal, kv_lens, q_lens, attn_mask, kv_starts, optimizer):
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


_TORCH_ONLY = Decision(None, "passed to torch unchanged", "torch only", "torch only")


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
        _default_optimizer.note(_TORCH_ONLY)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    causal = is_causal and query.shape[2] == key.shape[2]
    if is_causal and not causal:
        attn_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    return _default_optimizer.attention(query, key, value, scale=scale, causal=causal, attn_mask=attn_mask)
