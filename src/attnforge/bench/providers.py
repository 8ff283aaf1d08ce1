"""The implementations a kernel benchmark row times, and which rows each of them can run.

A provider turns inputs into a zero-argument call (`make_call`); everything a real caller would do once per
forward (building a mask) happens there, outside the timed call, and everything it does per attention call
(transformers' `repeat_kv`) happens inside. `supports(cfg, device)` says why a provider cannot run a row; such
a cell is reported "n/a" with that reason, never silently dropped.

Providers: attnforge's decode and prefill kernels (imported lazily: a missing kernel is "n/a"), each torch
SDPA backend forced with `sdpa_kernel` (flash, efficient, cudnn, math) and torch's own choice, all with
`enable_gqa`; transformers' path (K/V repeated per call, then SDPA); and the optimizer's choice. Prefill-only
paths (torch's causal_lower_right, flash per sequence, varlen; attnforge given a mask, at fixed launch
parameters) are in bench/prefill_providers.py.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnforge.config import MAX_DECODE_QUERY_LEN, SUPPORTED_HEAD_DIMS, AttentionConfig
from attnforge.environment import triton_status
from attnforge.kernels import reference

MASKS = ("none", "causal", "bool", "additive")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The math backend materializes the [B, Hq, Lq, Lkv] logits (and softmax) in fp32: skip it beyond this.
MATH_MAX_LOGIT_BYTES = 8 * 2**30


@dataclass(frozen=True)
class BenchConfig:
    """One row of the kernel sweep.

    Args:
        batch, num_heads, num_kv_heads, q_len, kv_len, head_dim: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`.
        dtype: "bfloat16", "float16" or "float32".
        mask: "none", "causal" (bottom-right), "bool" (random keep mask) or "additive" (random bias with
            -inf holes).
        ragged: per-sequence valid lengths `kv_lens` below Lkv (static cache / padded batch).
        padded: a padded batch of prompts (Lq == Lkv): per-sequence valid lengths used as both `q_lens` and
            `kv_lens`; query rows beyond them are padding, written as 0.
    """

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    mask: str = "causal"
    ragged: bool = False
    padded: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; accepted: {sorted(DTYPES)}")
        if self.mask not in MASKS:
            raise ValueError(f"mask={self.mask!r} is not supported; accepted: {MASKS}")
        if self.padded and (self.ragged or self.q_len != self.kv_len):
            raise ValueError(
                f"padded=True needs q_len == kv_len (got {self.q_len}, {self.kv_len}) and ragged=False"
            )
        self.attention_config()  # the sizes of a real call (AttentionConfig's checks)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def phase(self) -> str:
        return self.attention_config().phase

    @property
    def pattern(self) -> str:
        return self.attention_config().attention_pattern

    @property
    def label(self) -> str:
        extra = " ragged" if self.ragged else " padded" if self.padded else ""
        return (
            f"{self.phase} B={self.batch} {self.num_heads}:{self.num_kv_heads} Lq={self.q_len} "
            f"Lkv={self.kv_len} D={self.head_dim} {self.dtype} {self.mask}{extra}"
        )

    def attention_config(self) -> AttentionConfig:
        """The row's call (sizes, dtype, causal or not; the mask and lengths are the row's own fields)."""
        sizes = (self.batch, self.num_heads, self.num_kv_heads, self.q_len, self.kv_len, self.head_dim)
        return AttentionConfig.from_sizes(*sizes, dtype=self.torch_dtype, causal=self.causal)

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "mask": self.mask,
            "ragged": self.ragged,
            "padded": self.padded,
            "phase": self.phase,
            "pattern": self.pattern,
        }


Call = Callable[[], torch.Tensor]


@dataclass
class Provider:
    """One implementation under test.

    role: "candidate" (attnforge's kernels, the optimizer) or "baseline" (torch and transformers paths).
    make_call(q, k, v, *, causal, scale, kv_lens, q_lens, attn_mask, out) -> zero-argument call; a call with
        an `unpack` attribute returns its own layout (torch's varlen: packed tokens), which `unpack(result)`
        turns into `[B, Hq, Lq, D]` for the check (untimed).
    supports(cfg, device) -> (True, "") or (False, why).
    writes_out: the call writes into `out=` (so the correctness check pre-fills it with NaN).
    Baselines leave padded query rows (beyond `q_lens`) undefined; the check zeroes them, as attnforge writes.
    """

    name: str
    role: str
    description: str
    make_call: Callable[..., Call]
    supports: Callable[[BenchConfig, torch.device], tuple[bool, str]]
    writes_out: bool = False
    state: dict = field(default_factory=dict, repr=False)

    def checkable(self) -> Callable:
        """The provider as a function `fn(q, k, v, **case.kwargs())` for `verify.check`."""

        def run(q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None):
            options = dict(causal=causal, scale=scale, kv_lens=kv_lens, attn_mask=attn_mask)
            if q_lens is not None:  # only then: providers written before q_lens existed take no such keyword
                options["q_lens"] = q_lens
            call = self.make_call(q, k, v, **options, **({"out": out} if self.writes_out else {}))
            result = call()
            if getattr(call, "unpack", None) is not None:
                result = call.unpack(result)
            if self.role == "baseline" and q_lens is not None:
                result = zero_padded_rows(result, q_lens)
            return result

        if self.writes_out:
            return run

        def run_no_out(q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, attn_mask=None):
            return run(
                q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, q_lens=q_lens, attn_mask=attn_mask
            )

        return run_no_out


def zero_padding(t: torch.Tensor, kv_lens: torch.Tensor | None) -> torch.Tensor:
    """A copy of k or v `[B, Hkv, Lkv, D]` with keys at or beyond `kv_lens[b]` set to 0 (`t` itself without
    lengths). torch's masked kernels still multiply masked keys' values, and NaN there poisons every row
    (0 * NaN); callers of those paths keep zeros in their padding (transformers' caches). Built untimed."""
    if kv_lens is None:
        return t
    keys = torch.arange(t.shape[2], device=t.device)
    padding = keys[None, :] >= kv_lens.to(t.device)[:, None]
    return t.masked_fill(padding[:, None, :, None], 0.0)


def zero_padded_rows(out: torch.Tensor, q_lens: torch.Tensor) -> torch.Tensor:
    """`out` `[B, Hq, Lq, D]` with query rows at or beyond `q_lens[b]` set to 0 (attnforge's convention)."""
    rows = torch.arange(out.shape[2], device=out.device)
    padding = rows[None, :] >= q_lens.to(out.device)[:, None]
    return out.masked_fill(padding[:, None, :, None], 0.0)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def _common_support(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim={cfg.head_dim} is not supported {SUPPORTED_HEAD_DIMS}"
    return True, ""


def _import(module_name: str, function_name: str) -> tuple[Callable | None, str]:
    """A function from a module that may not exist yet, or None and why."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None, f"{module_name} is not part of this installation"
        return None, f"importing {module_name} failed: {error}"
    except Exception as error:  # noqa: BLE001 - a broken module makes its provider n/a, not the whole run
        return None, f"importing {module_name} raised {type(error).__name__}: {error}"
    function = getattr(module, function_name, None)
    if function is None:
        return None, f"{module_name} has no {function_name}"
    return function, ""


def prepared_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    kv_lens: torch.Tensor | None,
    attn_mask,
    q_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for torch SDPA with attnforge's semantics, built once (outside timed calls).

    Square causal without lengths or masks uses torch's own `is_causal` (top-left equals bottom-right there);
    one query with causal needs no mask at all.
    """
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    if causal and q_len == 1:
        causal = False
    if causal and q_len == kv_len and kv_lens is None and q_lens is None and attn_mask is None:
        return None, True
    visible = reference.visibility_mask(
        batch, q_len, kv_len, causal=causal, kv_lens=kv_lens, q_lens=q_lens, device=q.device
    )
    if attn_mask is None:
        return visible, False
    if visible is None:
        return attn_mask, False
    if attn_mask.dtype == torch.bool:
        return visible & attn_mask, False
    return attn_mask.to(q.dtype).masked_fill(~visible, float("-inf")), False


# ----------------------------------------------------------------------------------------------------------
# attnforge kernels


def _triton_support(device: torch.device) -> tuple[bool, str]:
    return triton_status(device)


def _decode_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if cfg.phase != "decode":
        return False, f"prefill row (q_len > {MAX_DECODE_QUERY_LEN}): the prefill kernel's"
    if cfg.mask in ("bool", "additive"):
        return False, f"the decode kernel takes no attn_mask (mask={cfg.mask})"
    if cfg.padded:
        return False, "the decode kernel takes no q_lens (padded batch of prompts)"
    if cfg.mask == "none" and cfg.q_len > 1:
        return False, "the decode kernel is causal among the new tokens; mask=none with q_len > 1 differs"
    ok, why = _common_support(cfg, device)
    if not ok:
        return ok, why
    _, missing = _import("attnforge.kernels.decode", "decode_attention")
    if missing:
        return False, missing
    return _triton_support(device)


def _decode_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    decode_attention, missing = _import("attnforge.kernels.decode", "decode_attention")
    if decode_attention is None:
        raise RuntimeError(missing)
    if attn_mask is not None or q_lens is not None:
        raise ValueError("the decode kernel takes no attn_mask and no q_lens")
    if not causal and q.shape[2] > 1:
        raise ValueError("the decode kernel is causal among the new tokens (causal=False needs q_len=1)")
    lens = None if kv_lens is None else kv_lens.to(device=q.device, dtype=torch.int32)
    return lambda: decode_attention(q, k, v, scale=scale, kv_lens=lens, out=out)


def prefill_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    if cfg.phase != "prefill":
        return False, f"decode row (q_len <= {MAX_DECODE_QUERY_LEN}): the decode kernel's"
    ok, why = _common_support(cfg, device)
    if not ok:
        return ok, why
    fn, missing = _import("attnforge.kernels.prefill", "prefill_attention")
    if fn is None:
        return False, missing
    params = inspect.signature(fn).parameters
    if cfg.mask in ("bool", "additive") and "attn_mask" not in params:
        return False, "prefill_attention takes no attn_mask"
    return _triton_support(device)


def _prefill_call(
    q, k, v, *, causal=True, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    prefill_attention, missing = _import("attnforge.kernels.prefill", "prefill_attention")
    if prefill_attention is None:
        raise RuntimeError(missing)
    kwargs = {"scale": scale, "causal": causal}
    for name, lens in (("kv_lens", kv_lens), ("q_lens", q_lens)):
        if lens is not None:
            kwargs[name] = lens.to(device=q.device, dtype=torch.int32)
    if attn_mask is not None:
        kwargs["attn_mask"] = attn_mask
    if out is not None:
        kwargs["out"] = out
    return lambda: prefill_attention(q, k, v, **kwargs)


def _prefill_writes_out() -> bool:
    fn, _ = _import("attnforge.kernels.prefill", "prefill_attention")
    return fn is not None and "out" in inspect.signature(fn).parameters


# ----------------------------------------------------------------------------------------------------------
# torch SDPA backends and the transformers path

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _needs_mask(cfg: BenchConfig) -> bool:
    square_causal = cfg.causal and cfg.q_len == cfg.kv_len
    single_query_causal = cfg.causal and cfg.q_len == 1
    return (
        cfg.ragged
        or cfg.padded
        or cfg.mask in ("bool", "additive")
        or not (square_causal or single_query_causal or cfg.mask == "none")
    )


def _sdpa_supports(backend: str) -> Callable[[BenchConfig, torch.device], tuple[bool, str]]:
    def supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
        if backend in ("efficient", "cudnn") and device.type != "cuda":
            return False, f"torch's {backend} backend needs a CUDA GPU"
        if backend == "flash" and _needs_mask(cfg):
            if cfg.ragged or cfg.padded:
                why = "per-sequence lengths need"
            elif cfg.mask in ("bool", "additive"):
                why = f"mask={cfg.mask} is"
            else:
                why = "bottom-right causal with Lq != Lkv needs"
            return False, f"torch's flash backend takes no explicit mask ({why} one)"
        if backend == "math":
            logit_bytes = 4 * cfg.batch * cfg.num_heads * cfg.q_len * cfg.kv_len
            if logit_bytes > MATH_MAX_LOGIT_BYTES:
                gib = logit_bytes / 2**30
                return False, f"the math backend would materialize {gib:.0f} GiB of fp32 logits"
        return True, ""

    return supports


def sdpa_call(backend: str | None) -> Callable[..., Call]:
    """torch SDPA with enable_gqa, forced to one backend (None: torch's own choice)."""

    def make(
        q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
    ) -> Call:
        mask, is_causal = prepared_mask(
            q, k, causal=causal, kv_lens=kv_lens, attn_mask=attn_mask, q_lens=q_lens
        )
        k, v = zero_padding(k, kv_lens), zero_padding(v, kv_lens)
        q, k, v = reference.fused_sdpa_safe(q, k, v)  # torch's flash faults on unaligned views
        backends = [SDPA_BACKENDS[backend]] if backend else list(SDPA_BACKENDS.values())

        def call_with(keys, values, gqa: bool) -> Call:
            def call() -> torch.Tensor:
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(
                        q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
                    )

            return call

        group = q.shape[1] // k.shape[1]
        call = call_with(k, v, group > 1)
        if group == 1 or backend is None:
            return call
        try:
            call()
        except RuntimeError:
            # This backend refuses enable_gqa: give it K/V expanded once, outside the timed call (a stronger
            # baseline than transformers' per-call repeat_kv), and say so.
            keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            call = call_with(keys, values, False)
            call.note = f"{backend} refused enable_gqa: K/V expanded to Hq heads once, outside the timed call"
        return call

    return make


def repeat_kv_call(
    q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    """transformers' sdpa path: K/V repeated to Hq heads in every call, mask built once per forward."""
    mask, is_causal = prepared_mask(q, k, causal=causal, kv_lens=kv_lens, attn_mask=attn_mask, q_lens=q_lens)
    k, v = zero_padding(k, kv_lens), zero_padding(v, kv_lens)
    q, k, v = reference.fused_sdpa_safe(q, k, v)  # torch's flash faults on unaligned views
    group = q.shape[1] // k.shape[1]

    def call() -> torch.Tensor:
        keys, values = k, v
        if group > 1:
            keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale
        )

    return call


def _always(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    return True, ""


# ----------------------------------------------------------------------------------------------------------
# The optimizer's choice


def _optimizer_supports(cfg: BenchConfig, device: torch.device) -> tuple[bool, str]:
    optimizer_class, missing = _import("attnforge.optimizer", "AttentionOptimizer")
    return (False, missing) if optimizer_class is None else (True, "")


def optimizer_decision(cfg: BenchConfig, device: torch.device) -> str:
    """The optimizer's decision for a row, as its sentence ("" when there is no optimizer)."""
    optimizer_class, missing = _import("attnforge.optimizer", "AttentionOptimizer")
    if optimizer_class is None:
        return missing
    features_class, _ = _import("attnforge.optimizer", "CallFeatures")
    features = None
    if features_class is not None:
        has_mask = cfg.mask in ("bool", "additive")
        features = features_class(
            causal=cfg.causal, has_mask=has_mask, has_kv_lens=cfg.ragged or cfg.padded, has_q_lens=cfg.padded
        )
    _, reason = optimizer_class().should_optimize(cfg.attention_config(), device=device, features=features)
    return reason


def _optimizer_call(
    q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, attn_mask=None, out=None
) -> Call:
    optimizer_class, missing = _import("attnforge.optimizer", "AttentionOptimizer")
    if optimizer_class is None:
        raise RuntimeError(missing)
    optimizer = optimizer_class()
    lens = None if kv_lens is None else kv_lens.to(device=q.device, dtype=torch.int32)
    qlens = None if q_lens is None else q_lens.to(device=q.device, dtype=torch.int32)
    # Where it falls back it is torch's masked path, whose callers keep zeros in the padding (as torch's rows
    # get them); the kernels' own rows are what checks the poisoned padding.
    k, v = zero_padding(k, kv_lens), zero_padding(v, kv_lens)
    return lambda: optimizer.attention(
        q, k, v, scale=scale, causal=causal, kv_lens=lens, q_lens=qlens, attn_mask=attn_mask
    )


# ----------------------------------------------------------------------------------------------------------
# The registry


def default_providers() -> dict[str, Provider]:
    """Every provider, by name, in the order the tables show them."""
    providers = [
        Provider(
            "attnforge-decode",
            "candidate",
            "attnforge decode kernel (Triton, split-KV, GQA-packed)",
            _decode_call,
            _decode_supports,
            writes_out=True,
        ),
        Provider(
            "attnforge-prefill",
            "candidate",
            "attnforge prefill kernel (Triton)",
            _prefill_call,
            prefill_supports,
            writes_out=_prefill_writes_out(),
        ),
        Provider(
            "optimizer",
            "candidate",
            "attnforge optimizer's choice (kernel or torch SDPA fallback)",
            _optimizer_call,
            _optimizer_supports,
        ),
        Provider(
            "sdpa-auto",
            "baseline",
            "torch SDPA, enable_gqa, torch's own backend choice",
            sdpa_call(None),
            _always,
        ),
    ]
    for backend in SDPA_BACKENDS:
        providers.append(
            Provider(
                f"sdpa-{backend}",
                "baseline",
                f"torch SDPA, enable_gqa, {backend} backend forced",
                sdpa_call(backend),
                _sdpa_supports(backend),
            )
        )
    providers.append(
        Provider(
            "hf-repeat_kv",
            "baseline",
            "transformers' sdpa path: repeat_kv copies, then torch SDPA",
            repeat_kv_call,
            _always,
        )
    )
    from attnforge.bench.prefill_providers import prefill_baselines

    providers += prefill_baselines()
    return {p.name: p for p in providers}


def kernel_for(cfg: BenchConfig) -> str:
    """The attnforge kernel provider a row measures: decode for decode rows, prefill otherwise."""
    return "attnforge-decode" if cfg.phase == "decode" else "attnforge-prefill"


def select(providers: dict[str, Provider], names: list[str] | None) -> dict[str, Provider]:
    """A subset of providers by name; unknown names raise ValueError listing the known ones."""
    if not names:
        return providers
    unknown = [name for name in names if name not in providers]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; accepted: {list(providers)}")
    return {name: providers[name] for name in names}
