"""A decode step's route, decided once per forward: what makes the transformers fallback free.

Eager generation with a DynamicCache is bound by the host, and every decode step calls the attention
function once per layer with the same shapes. Between two layers the CPU caches are cold, so each Python line
the attention function runs per call costs far more in place than in a loop (issue 9; docs/notes/fallback.md).
So the mask hook, which transformers calls once per forward, asks the optimizer about this forward's decode
calls (shapes from the model's config) and records a `DecodePlan` with the answer: torch SDPA or attnforge's
decode kernel. The attention function then serves each call the plan covers after a few comparisons: with
exactly the SDPA call transformers' own `sdpa_attention_forward` makes for it (same arguments, so the same
backend and the same numbers), or with the decode kernel; either way counted under the optimizer's decision,
without a lookup per call. Anything the plan does not cover takes the general path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnforge.kernels import reference
from attnforge.optimizer import AttentionOptimizer, CallFeatures, Decision

_DECODE = CallFeatures(causal=False)  # one new token, no mask, no valid lengths: what a planned call is


class DecodePlan:
    """This forward's decode calls as the mask hook announced them, and the optimizer's decision for them
    (torch SDPA, or the decode kernel: `kernel`)."""

    __slots__ = (
        "query", "key", "dtype", "device", "cuda", "kernel", "decision", "optimizer", "epoch", "entry",
        "prepared",
    )  # fmt: skip

    def __init__(self, query, key, dtype, device, decision: Decision, optimizer: AttentionOptimizer) -> None:
        self.query, self.key, self.dtype, self.device = query, key, dtype, device
        self.cuda, self.kernel = device.type == "cuda", decision.kernel == "decode"
        self.decision, self.optimizer, self.epoch = decision, optimizer, optimizer.epoch
        self.entry: list | None = None  # the decision's live statistics entry, from the first call served
        # The kernel's launch prepared once for all of this forward's calls (None: the general kernel call).
        self.prepared = optimizer.prepared_decode(query, key, dtype, device) if self.kernel else None


class _Current:
    """The plan the last decode forward's mask hook made (a verified cache: a call uses it only where the
    call is exactly what the plan was decided for, and only while the optimizer's decisions stand)."""

    plan: DecodePlan | None = None


def plan_decode(optimizer: AttentionOptimizer, shape: tuple | None, dtype, device) -> None:
    """Record the plan for a decode forward whose calls have `shape` (B, Hq, Hkv, D, 1, Lkv), or forget the
    plan where these calls are not planned: transformers would not make one plain SDPA call for them (head_dim
    over 256 repeats the KV heads; devices other than CUDA and CPU)."""
    if torch.compiler.is_compiling():
        return  # a traced forward keeps no state
    _Current.plan = None
    if shape is None or not isinstance(dtype, torch.dtype):
        return
    device = torch.device(device)
    batch, heads, kv_heads, head_dim, q_length, kv_length = shape
    if q_length != 1 or head_dim > 256 or device.type not in ("cuda", "cpu"):
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    query, key = torch.Size((batch, heads, 1, head_dim)), torch.Size((batch, kv_heads, kv_length, head_dim))
    decision = optimizer.decision_for(query, key, key, dtype, device, _DECODE)
    if decision.kernel in (None, "decode"):
        _Current.plan = DecodePlan(query, key, dtype, device, decision, optimizer)


def current_plan() -> DecodePlan | None:
    return _Current.plan


def planned_decode(
    module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor | None:
    """The output `[B, 1, Hq, D]` of a decode call the current plan covers (counted), else None.

    q `[B, Hq, 1, D]`, k/v `[B, Hkv, Lkv, D]`. For plain calls only: the caller has checked there is no
    mask, dropout, softcap or position bias. Each tensor property read costs ~0.5 us here, so the order
    matters: the cheapest test that fails first.
    """
    plan = _Current.plan
    if (
        plan is None
        or plan.epoch != plan.optimizer.epoch
        or key.shape != plan.key
        or query.shape != plan.query
        or value.shape != plan.key
        or query.dtype is not plan.dtype
        or query.device != plan.device
        or torch.compiler.is_compiling()
    ):
        return None
    if plan.kernel:
        out = plan.optimizer.run_planned_decode(query, key, value, scale, plan.prepared)
        if out is None:
            return None  # the kernel failed (remembered): the general path counts the call and runs torch
        out = out.transpose(1, 2)  # as the general path returns the kernel's output
    elif plan.cuda and not reference.fused_sdpa_aligned(query, key, value):
        return None  # the general path copies what torch's fused kernels cannot take
    else:
        # As transformers' sdpa_attention_forward calls it for one query without a mask (GQA by its rule).
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=0.0, scale=scale, is_causal=False,
            enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
        ).transpose(1, 2).contiguous()  # fmt: skip
    if plan.entry is None:
        plan.entry = plan.optimizer.tally(plan.decision)
    else:
        plan.entry[1] += 1  # counted as `optimizer.note` would, without its lookup
    return out
