"""Hugging Face transformers integration: attention implementation "attnforge".

`patch_transformers()` registers an attention function and its mask function with transformers'
`AttentionInterface` / `AttentionMaskInterface` and makes models of supported families loaded afterwards use
it; `patch_model(model)` switches a loaded model (`set_attn_implementation`). Every call goes through the
process-wide optimizer (optimizer.py), which picks attnforge's kernels or torch SDPA and counts what it did.

Calls the optimizer sends to torch run exactly what transformers' own "sdpa" runs: the mask hook returns
transformers' `sdpa_mask` and the attention function calls transformers' `sdpa_attention_forward` (or, for a
decode step planned once per forward, makes the same torch SDPA call itself: transformers_plan.py). Where the
optimizer chose a kernel and the pattern is plain causal, the mask hook instead returns
  - None when attention gets exactly the valid keys (DynamicCache, no padding): plain bottom-right causal;
  - `[B, 1, 1, 1]` int32: keys `[0, end)` are valid (`end` = tokens in the cache after this step), so a
    static cache is read only up to its valid length (`kv_lens`) and decode needs no mask at all;
  - `[B, 1, 1, 2]` int32: keys `[start_b, end)` are valid (left-padded batch): the attention function passes
    them on as `kv_lens` and `kv_starts`, so decode steps stay on the decode kernel.
Other patterns (sliding window, custom overlays, right padding, padding masks inside a compiled graph) get
transformers' own mask and so its own attention.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from attnforge.environment import package_version
from attnforge.integrations.transformers_plan import plan_decode, planned_decode
from attnforge.kernels import reference
from attnforge.optimizer import CallFeatures, configure_optimizer, get_optimizer

IMPLEMENTATION = "attnforge"
logger = logging.getLogger("attnforge.integrations.transformers")


# ----------------------------------------------------------------------------------------------------------
# Which model families attnforge serves (keyed by config.model_type)


@dataclass(frozen=True)
class Family:
    """Whether a model family runs on attnforge, and what that means for its layers."""

    supported: bool
    note: str


_SLIDING = "sliding-window layers (when the config sets a window) carry a mask: prefill kernel or torch SDPA"
_GEMMA3 = "full-attention layers dispatched by attnforge; sliding-window layers carry a mask: prefill/SDPA"
FAMILIES: dict[str, Family] = {
    "llama": Family(True, "GQA with RoPE: every layer dispatched by attnforge"),
    "mistral": Family(True, f"GQA: every layer dispatched by attnforge; {_SLIDING}"),
    "qwen2": Family(True, f"GQA with q/k/v bias: every layer dispatched by attnforge; {_SLIDING}"),
    "qwen3": Family(True, f"GQA with q/k norm: every layer dispatched by attnforge; {_SLIDING}"),
    "gemma": Family(True, "MQA/GQA, head_dim 256: every layer dispatched by attnforge"),
    "gemma2": Family(
        False,
        "attention logit softcapping (tanh) is in every layer and neither attnforge's kernels nor torch SDPA "
        "implement it: the model keeps its own attention",
    ),
    "gemma3": Family(True, _GEMMA3),
    "gemma3_text": Family(True, _GEMMA3),
    "phi3": Family(True, f"MHA/GQA with fused qkv: every layer dispatched by attnforge; {_SLIDING}"),
    "deepseek_v3": Family(
        False,
        "multi-head latent attention (MLA): the value head_dim differs from the query/key head_dim, which "
        "attnforge's kernels do not support: the model keeps its own attention",
    ),
}


def family_support(model_or_config) -> tuple[bool, str]:
    """(supported, note) for a model, a config or a `model_type` string."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return False, f"model_type={model_type!r} is not in attnforge's family table {sorted(FAMILIES)}"
    return family.supported, family.note


# ----------------------------------------------------------------------------------------------------------
# The mask function (AttentionMaskInterface)


def attnforge_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask hook: valid ranges where attnforge's kernels will run, else transformers' own mask.

    When the optimizer sends this forward's attention calls to a kernel and the pattern is plain causal over
    valid ranges (a static cache, left padding), returns int32 `[B, 1, 1, 1]` ends (keys `[0, end)` valid) or
    `[B, 1, 1, 2]` (start, end) pairs, so the kernel reads only valid keys. Otherwise returns exactly what
    transformers' `sdpa_mask` returns for the same arguments (None or a bool `[B, 1, Lq, Lkv]` mask), so
    calls that go to torch run as they would without attnforge.
    """
    arguments = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     device=device, **kwargs)  # fmt: skip
    if mask_function is not causal_mask_function or (
        attention_mask is not None and torch.compiler.is_compiling()
    ):
        return sdpa_mask(**arguments)  # other patterns, or padding we cannot read while tracing
    shape = _call_shape(kwargs.get("config"), batch_size, q_length, kv_length)
    # A DynamicCache without padding: exactly the valid keys, and one query or as many as keys (where a
    # prompt continues a cache, None would let torch SDPA align the causal mask top-left: that gets a mask).
    exact = not isinstance(q_offset, torch.Tensor) and q_offset + q_length - kv_offset == kv_length
    if (
        exact
        and q_length in (1, kv_length)
        and (attention_mask is None or _all_valid(attention_mask, q_offset, q_length))
    ):
        plan_decode(get_optimizer(), shape, kwargs.get("dtype"), device)
        return None  # as sdpa_mask: plain causal
    if not _forward_uses_kernel(shape, str(kwargs.get("dtype")), str(torch.device(device))):
        return sdpa_mask(**arguments)
    # Keys in the cache after this step; StaticCache gives q_offset as a tensor (kept on device: no sync).
    end = torch.as_tensor(q_offset, device=device).to(torch.int32) + (q_length - kv_offset)
    ends = end.reshape(1, 1, 1, 1).expand(batch_size, 1, 1, 1).contiguous()
    if attention_mask is None or _all_valid(attention_mask, q_offset, q_length):
        return ends
    starts = _left_padding_starts(attention_mask, kv_length, kv_offset, int(end.item()))
    if starts is None:
        return sdpa_mask(**arguments)
    return torch.cat([starts.to(device, torch.int32).reshape(batch_size, 1, 1, 1), ends], dim=-1)


def _all_valid(attention_mask: torch.Tensor, q_offset, q_length: int) -> bool:
    """The 2D padding mask marks every token valid (one host sync, as transformers' sdpa_mask does)."""
    covers = isinstance(q_offset, torch.Tensor) or attention_mask.shape[-1] >= q_offset + q_length
    return covers and bool(attention_mask.all())


def _call_shape(config, batch: int, q_length: int, kv_length: int) -> tuple | None:
    """(B, Hq, Hkv, D, Lq, Lkv) of this forward's attention calls, from the model's config (or None).

    Under tensor parallelism each rank's calls carry 1/shards of the heads (see `note_head_shards`): the
    decision must be made for those local counts, as the attention function will see them.
    """
    config = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    shards = head_shards(config)
    return (batch, heads // shards, max(kv_heads // shards, 1), head_dim, q_length, kv_length)


def note_head_shards(config, shards: int) -> None:
    """Record that calls of models with this config see 1/shards of its heads (tensor parallelism, tp_size =
    shards); the TP loader calls it, and so does the attention function on a call with fewer heads."""
    config = getattr(config, "get_text_config", lambda: config)()
    if shards < 1:
        raise ValueError(f"shards={shards} must be at least 1")
    key = id(config)
    if shards == 1:
        _STATE.head_shards.pop(key, None)
        return
    forget = weakref.ref(config, lambda _, key=key: _STATE.head_shards.pop(key, None))
    _STATE.head_shards[key] = (forget, shards)


def head_shards(config) -> int:
    """How many ways this config's heads are split (1 unless `note_head_shards` recorded more)."""
    config = getattr(config, "get_text_config", lambda: config)()
    ref, shards = _STATE.head_shards.get(id(config), (None, 1))
    return shards if ref is not None and ref() is config else 1


# In a module's __dict__ once its head count was compared with its config's (the hot path's cheapest test).
_HEADS_CHECKED = "_attnforge_heads_checked"


def _learn_head_shards(module: torch.nn.Module, query: torch.Tensor) -> None:
    """Record tensor-parallel sharding from a call with fewer query heads than the module's config names
    (once per module: the attention function calls it only for modules without the `_HEADS_CHECKED` mark)."""
    module.__dict__[_HEADS_CHECKED] = True
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    local = query.shape[1] if query.dim() == 4 else 0
    shards = heads // local if isinstance(heads, int) and 0 < local < heads and heads % local == 0 else 1
    if shards > 1 and head_shards(config) != shards:
        note_head_shards(config, shards)


@torch.compiler.assume_constant_result
def _forward_uses_kernel(shape: tuple | None, dtype: str, device: str) -> bool:
    """Whether the optimizer sends calls of this shape, with valid lengths, to an attnforge kernel.

    Plain values only: under torch.compile the answer is computed once, while tracing, and kept as a constant.
    """
    if shape is None:
        return False
    batch, heads, kv_heads, head_dim, q_length, kv_length = shape
    torch_dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(torch_dtype, torch.dtype):
        return False
    # Traced for torch.compile, whose decode steps transformers compiles with CUDA graphs ("reduce-overhead"):
    # the calls are captured there. Eager, they are not (and torch serves decode calls; EAGER_DECODE).
    features = CallFeatures(causal=q_length > 1, has_kv_lens=True, captured=torch.compiler.is_compiling())
    decision = get_optimizer().decision_for(
        (batch, heads, q_length, head_dim), (batch, kv_heads, kv_length, head_dim),
        (batch, kv_heads, kv_length, head_dim), torch_dtype, torch.device(device), features,
    )  # fmt: skip
    return decision.optimized


def _left_padding_starts(
    attention_mask: torch.Tensor, kv_length: int, kv_offset: int, end: int
) -> torch.Tensor | None:
    """First valid key per sequence if the 2D padding mask is left padding only (else None)."""
    padding = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)[
        :, kv_offset : kv_offset + end
    ]
    starts = padding.int().argmax(dim=-1)
    left_padded = torch.arange(padding.shape[-1], device=padding.device)[None, :] >= starts[:, None]
    return starts if bool((padding == left_padded).all()) else None


# ----------------------------------------------------------------------------------------------------------
# The attention function (AttentionInterface)


def attnforge_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook.

    q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` (the whole cache) -> (`[B, Lq, Hq, Dv]`, None). Valid ranges
    from `attnforge_mask` go to attnforge's kernels; a decode call the mask hook planned runs as planned (the
    SDPA call transformers would make, or the decode kernel: transformers_plan.py); any other call runs the
    kernel the optimizer chose for it, else transformers' own `sdpa_attention_forward`, unchanged.
    """
    plain = attention_mask is None and not dropout and softcap is None
    if plain and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None:
        out = planned_decode(module, query, key, value, scaling)  # a decode step the mask hook planned
        # (None: not planned, or not as planned: decided below)
        if out is not None:
            return out, None
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "attn_implementation='attnforge' does not support s_aux (attention sinks); use 'eager'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    compiling = torch.compiler.is_compiling()
    if not compiling and _HEADS_CHECKED not in module.__dict__:
        _learn_head_shards(module, query)
    optimizer = get_optimizer()
    if attention_mask is not None and attention_mask.dtype == torch.int32:
        kv_lens, kv_starts = _read_ranges(attention_mask)
        out = optimizer.attention(
            query, key, value, scale=scaling, causal=causal, kv_lens=kv_lens, kv_starts=kv_starts
        )
        return out.transpose(1, 2), None
    if softcap is not None or (dropout and module.training):
        out = reference.math_attention(
            query, key, value, scale=scaling, causal=causal, attn_mask=attention_mask, softcap=softcap,
            dropout=dropout,
        )  # fmt: skip
        return out.transpose(1, 2), None
    if kwargs.get("position_bias") is None:
        out = _kernel_or_none(optimizer, compiling, query, key, value, scaling, causal, attention_mask)
        if out is not None:
            return out.transpose(1, 2), None
    query, key, value = reference.fused_sdpa_safe(query, key, value, on_copy=optimizer.stats.record_copy)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
        **kwargs,
    )  # fmt: skip


def _kernel_or_none(optimizer, compiling, query, key, value, scale, causal, mask) -> torch.Tensor | None:
    """attnforge's kernel where the optimizer chooses it for this call (counted either way), else None.
    `mask` is transformers' own (None: plain causal over exactly the valid keys; else it holds the pattern).
    Inside torch.compile, calls without a mask are decided when the graph runs (one custom op); calls with
    one are traced as transformers' sdpa attention."""
    causal = causal and mask is None and query.shape[2] > 1
    if not compiling:
        return optimizer.run_kernel_if_chosen(query, key, value, scale=scale, causal=causal, attn_mask=mask)
    if mask is None:
        return optimizer.attention(query, key, value, scale=scale, causal=causal)
    return None


def _read_ranges(ranges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kv_lens `[B]`, kv_starts `[B]` or None) from the int32 ranges `attnforge_mask` produced: the lengths
    travel to the kernels as they are (a left-padded decode step stays on the decode kernel)."""
    ranges = ranges.reshape(ranges.shape[0], -1)
    return ranges[:, -1], (ranges[:, 0] if ranges.shape[1] == 2 else None)


# ----------------------------------------------------------------------------------------------------------
# Patching


class _PatchState:
    """What was there before attnforge touched transformers, so unpatching restores exactly that."""

    def __init__(self) -> None:
        self.saved_registrations: dict | None = None
        self.saved_default = None
        self.saved_config_property: property | None = None
        self.default_patched = False
        self.models: weakref.WeakSet = weakref.WeakSet()
        # id(config) -> (weak reference, value): attn_implementation requests seen while patched
        self.requests: dict[int, tuple[weakref.ref, object]] = {}
        # id(text config) -> (weak reference, shards): tensor-parallel head splits (see note_head_shards)
        self.head_shards: dict[int, tuple[weakref.ref, int]] = {}


_STATE = _PatchState()
_MISSING = object()


def _register() -> None:
    """Add "attnforge" to both interfaces, remembering what they held before (once)."""
    if _STATE.saved_registrations is None:
        _STATE.saved_registrations = {
            AttentionInterface: AttentionInterface._global_mapping.get(IMPLEMENTATION, _MISSING),
            AttentionMaskInterface: AttentionMaskInterface._global_mapping.get(IMPLEMENTATION, _MISSING),
        }
    AttentionInterface.register(IMPLEMENTATION, attnforge_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, attnforge_mask)


def _unregister_if_unused() -> None:
    if _STATE.default_patched or len(_STATE.models) or _STATE.saved_registrations is None:
        return
    for interface, previous in _STATE.saved_registrations.items():
        if previous is _MISSING:
            interface._global_mapping.pop(IMPLEMENTATION, None)
        else:
            interface._global_mapping[IMPLEMENTATION] = previous
    _STATE.saved_registrations = None


def _recording_requests(original: property) -> property:
    """`PretrainedConfig._attn_implementation` that also remembers each value set through it.

    transformers writes the implementation it resolves for a model straight into
    `config._attn_implementation_internal`, and a user's request (`attn_implementation=` of from_pretrained /
    from_config / a config, or an assignment) through this setter: only the latter is an explicit choice.
    """

    def fset(config, value) -> None:
        key = id(config)
        _STATE.requests[key] = (weakref.ref(config, lambda _, key=key: _STATE.requests.pop(key, None)), value)
        original.fset(config, value)

    return property(original.fget, fset, original.fdel, original.__doc__)


def _filled_in(config, implementation) -> bool:
    """True unless `implementation` was asked for on this config since patch_transformers(): None, or a value
    transformers stored there for an earlier model (only told apart where requests are recorded)."""
    if implementation is None:
        return True
    if _STATE.saved_config_property is None:  # a transformers without the property: nothing was recorded
        return False
    ref, value = _STATE.requests.get(id(config), (None, None))
    requested = ref is not None and ref() is config and (value == implementation or isinstance(value, dict))
    return not requested


def _default_to_attnforge(original):
    """Wrap `get_correct_attn_implementation` so supported models built with no explicit choice get attnforge.

    A config that already served a model carries the implementation transformers resolved then (e.g.
    "sdpa"): unless it was requested since patching, it is replaced by attnforge, with a warning saying so.
    """

    def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
        replace = (
            (is_init_check or requested_attention is None)  # set_attn_implementation(x) is always explicit
            and requested_attention != IMPLEMENTATION
            and family_support(self.config)[0]
            and _filled_in(self.config, requested_attention)
        )
        if replace and requested_attention is not None:
            logger.warning(
                "attnforge: %s uses attn_implementation=%r instead of the %r its config carries: "
                "transformers stores the implementation it picked for an earlier model on the config, which "
                "cannot be told apart from a choice made before patch_transformers(); pass "
                "attn_implementation=%r when loading to keep it",
                type(self).__name__, IMPLEMENTATION, requested_attention, requested_attention,
            )  # fmt: skip
        return original(self, IMPLEMENTATION if replace else requested_attention, is_init_check)

    get_correct_attn_implementation.__attnforge_original__ = original
    return get_correct_attn_implementation


def patch_transformers(enable_debug: bool = False) -> int:
    """Register attnforge with transformers and make models of supported families loaded afterwards use it.

    Models loaded with an explicit `attn_implementation=` keep it; a config reused from a model built before
    patching gets attnforge (with a logged warning), as transformers stores its own pick there. Calling it
    twice is harmless.

    Returns:
        the number of model families (config.model_type values) that will use attnforge.
    """
    if enable_debug:
        configure_optimizer(enable_debug=True)
    _register()
    if not _STATE.default_patched:
        _STATE.saved_default = PreTrainedModel.__dict__["get_correct_attn_implementation"]
        PreTrainedModel.get_correct_attn_implementation = _default_to_attnforge(_STATE.saved_default)
        config_property = PretrainedConfig.__dict__.get("_attn_implementation")
        if isinstance(config_property, property):
            _STATE.saved_config_property = config_property
            PretrainedConfig._attn_implementation = _recording_requests(config_property)
        _STATE.default_patched = True
    return sum(family.supported for family in FAMILIES.values())


def unpatch_transformers() -> None:
    """Undo `patch_transformers`: the default attention and the interfaces are as they were before.

    The registrations stay while a model switched with `patch_model` still uses them.
    """
    if _STATE.default_patched:
        PreTrainedModel.get_correct_attn_implementation = _STATE.saved_default
        if _STATE.saved_config_property is not None:
            PretrainedConfig._attn_implementation = _STATE.saved_config_property
        _STATE.saved_default = _STATE.saved_config_property = None
        _STATE.requests.clear()
        _STATE.default_patched = False
    _unregister_if_unused()


def is_patched() -> bool:
    """True while `patch_transformers` is in effect."""
    return _STATE.default_patched


def _require_model(caller: str, model, accepted: str = "a transformers PreTrainedModel") -> None:
    if not isinstance(model, PreTrainedModel):
        hint = f" ({model!r}: load_and_patch_model loads a model by name)" if isinstance(model, str) else ""
        raise TypeError(f"{caller} expects {accepted}, got {type(model).__name__}{hint}")


def patch_model(model: PreTrainedModel, *, enable_debug: bool = False) -> bool:
    """Switch a loaded model to attnforge attention (`set_attn_implementation`) if its family is supported.

    Returns:
        True if the model now uses attnforge; False (with a logged reason) if its family is not supported.

    Raises:
        TypeError: `model` is not a transformers PreTrainedModel (e.g. None, or a name: see
            `load_and_patch_model`).
    """
    _require_model("patch_model", model)
    supported, note = family_support(model)
    if not supported:
        logger.warning("attnforge: not patching %s: %s", type(model).__name__, note)
        return False
    if enable_debug:
        configure_optimizer(enable_debug=True)
    _register()
    current = model.config._attn_implementation
    if current != IMPLEMENTATION:
        model._attnforge_previous_attn_implementation = current
        model.set_attn_implementation(IMPLEMENTATION)
    _STATE.models.add(model)
    return True


def unpatch_model(model: PreTrainedModel) -> None:
    """Give a model patched with `patch_model` back the attention implementation it had before.

    Raises:
        TypeError: `model` is not a transformers PreTrainedModel.
    """
    _require_model("unpatch_model", model)
    previous = getattr(model, "_attnforge_previous_attn_implementation", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._attnforge_previous_attn_implementation
    _STATE.models.discard(model)
    _unregister_if_unused()


def load_and_patch_model(
    model: str | PreTrainedModel,
    *,
    enable_debug: bool = False,
    evolved_program: str | os.PathLike | None = None,
    **load_options,
) -> PreTrainedModel:
    """`models.load_model(model, **load_options)` (bundled name: random weights; hub id or path: trained), or
    a model already loaded, then `patch_model` on it. Returns the model (unpatched, with a logged reason, if
    its family is not supported).

    Args:
        evolved_program: a program from attnforge's evolutionary search (`attention(q, k, v, *, scale, causal,
            kv_lens)`). It first runs the evolve evaluator's correctness stages on this machine at the model's
            attention shapes and dtype, in a child process; only if every case passes does the optimizer run
            it wherever it would run attnforge's decode kernel.

    Raises:
        EvolvedProgramRejected (a ValueError): the evolved program failed a case; the message names it.
        TypeError: `load_options` given with a model that is already loaded.
    """
    from attnforge.models import load_model

    if isinstance(model, PreTrainedModel):
        if load_options:
            raise TypeError(
                f"load options {sorted(load_options)} need a model name or path, not a loaded model"
            )
        loaded = model
    else:
        loaded = load_model(model, **load_options)
    if evolved_program is not None:
        from attnforge.evolve.adopt import adopt_decode_kernel

        config = getattr(loaded.config, "get_text_config", lambda: loaded.config)()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        adopt_decode_kernel(evolved_program, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                            dtype=loaded.dtype, cuda=loaded.device.type == "cuda")  # fmt: skip
    patch_model(loaded, enable_debug=enable_debug)
    return loaded


@contextlib.contextmanager
def optimized(model: PreTrainedModel | None = None, *, enable_debug: bool = False) -> Iterator[None]:
    """`with optimized():` patch transformers for the block; `with optimized(model):` patch that model.

    Raises:
        TypeError: `model` is neither None nor a transformers PreTrainedModel.
    """
    if model is not None:
        _require_model("optimized", model, "a transformers PreTrainedModel or None")
        patched = patch_model(model, enable_debug=enable_debug)
        try:
            yield
        finally:
            if patched:
                unpatch_model(model)
        return
    already = is_patched()
    patch_transformers(enable_debug=enable_debug)
    try:
        yield
    finally:
        if not already:
            unpatch_transformers()


def get_integration_status() -> dict:
    """is_patched, the family table, the optimizer's statistics and the transformers version."""
    return {
        "is_patched": is_patched(),
        "registered": IMPLEMENTATION in AttentionInterface._global_mapping,
        "patched_models": len(_STATE.models),
        "families": {name: {"supported": f.supported, "note": f.note} for name, f in FAMILIES.items()},
        "optimizer_stats": get_optimizer().get_stats(),
        "transformers": package_version("transformers"),
    }
