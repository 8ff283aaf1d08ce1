"""Issue 9 diagnosis (scratch, kept with its results): which part of attnforge's attention hook costs time
in place (dynamic cache, GPU). Not part of the package; run from the repository root with PYTHONPATH=src.

Sides: "sdpa" (plain transformers) and registered variants (VARIANTS: attention function and mask function),
e.g. "pass" (a hook that only calls transformers' sdpa_attention_forward), "direct" (the torch SDPA call
itself), "pchk" (the plan's shape/dtype/device checks), "pchk_note" (+ counting through optimizer.note),
"pchk_align" (+ the alignment check), "af" (attnforge as committed at the recorded commit, every call to
torch), "kdirect" (decode steps through attnforge's decode kernel directly), "kprep" (through a launch
prepared once per shape, as a decode plan runs it), "afk" (attnforge with its kernels
on, measured or not).

Sides take turns token by token (round robin) inside each generate call; each side is a registered attention
implementation with a mask function. Part 2 times in place (perf_counter_ns) each variant's whole attention
call, its mask function and the host part of each decode forward.
usage: python diag_hook.py MODEL [RUNS] [NEW]
"""

import collections
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnforge as af
from attnforge.bench.generation import TokenClock, _sync_for
from attnforge.integrations import transformers as integ
from attnforge.integrations import transformers_plan as tp
from attnforge.kernels import reference
from attnforge.models import load_model

name = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
NEW = int(sys.argv[3]) if len(sys.argv) > 3 else 128
OUT = os.environ.get("OUT", "/tmp")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
m = load_model(
    name,
    dtype=torch.bfloat16,
    device=DEV,
    attn_implementation="sdpa",
    **({} if DEV == "cuda" else {"num_hidden_layers": 4}),
)
af.configure_optimizer(kernels=())
integ.patch_model(m)  # registers attnforge; we switch implementations by name below
opt = af.get_optimizer()
TIMES = collections.defaultdict(list)
TIMING = [False]


def v_pass(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    return sdpa_attention_forward(
        module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def v_align(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    q, k, v = reference.fused_sdpa_safe(q, k, v, on_copy=opt.stats.record_copy)
    return sdpa_attention_forward(
        module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def v_decide(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    opt.run_kernel_if_chosen(q, k, v, scale=scaling, causal=mask is None and q.shape[2] > 1, attn_mask=mask)
    return sdpa_attention_forward(
        module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def v_decide_only_lookup(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    return sdpa_attention_forward(
        module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def v_direct(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    if mask is not None or q.shape[2] != 1:
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None,
        dropout_p=0.0,
        scale=scaling,
        is_causal=False,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def v_pchk(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    if mask is not None or q.shape[2] != 1:
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    plan = tp._Current.plan
    if (
        plan is None
        or plan.epoch != plan.optimizer.epoch
        or k.shape != plan.key
        or q.shape != plan.query
        or v.shape != plan.key
        or q.dtype != plan.dtype
        or q.device != plan.device
    ):
        raise RuntimeError("no plan")
    return v_direct(module, q, k, v, mask, scaling=scaling)


def _pchk(q, k, v):
    plan = tp._Current.plan
    return not (
        plan is None
        or plan.epoch != plan.optimizer.epoch
        or k.shape != plan.key
        or q.shape != plan.query
        or v.shape != plan.key
        or q.dtype != plan.dtype
        or q.device != plan.device
    )


def v_pchk_note(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    if mask is not None or q.shape[2] != 1 or not _pchk(q, k, v):
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    tp._Current.plan.optimizer.note(tp._Current.plan.decision)
    return v_direct(module, q, k, v, mask, scaling=scaling)


def v_pchk_align(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    if mask is not None or q.shape[2] != 1 or not _pchk(q, k, v) or not reference.fused_sdpa_aligned(q, k, v):
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    return v_direct(module, q, k, v, mask, scaling=scaling)


def v_planned(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    if mask is not None or q.shape[2] != 1:
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    out = tp.planned_decode(module, q, k, v, scaling)
    if out is None:
        raise RuntimeError("no plan")
    return out, None


def v_kdirect(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """attnforge's decode kernel called directly for decode steps (no optimizer): its host cost in place."""
    from attnforge.kernels.decode import decode_attention

    if mask is not None or q.shape[2] != 1:
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    return decode_attention(q, k, v, scale=scaling).transpose(1, 2), None


_PREPARED = {}


def v_kprep(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """attnforge's decode kernel through a launch prepared once per shape (as a decode plan runs it)."""
    from attnforge.kernels.decode import prepared_decode

    if mask is not None or q.shape[2] != 1:
        return v_pass(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw)
    call = _PREPARED.get((q.shape, k.shape))
    if call is None:
        call = _PREPARED[(q.shape, k.shape)] = prepared_decode(q.shape, k.shape, q.dtype, q.device)
    return call(q, k, v, scaling).transpose(1, 2), None


VARIANTS = {  # name: (attention, mask)
    "kdirect": (v_kdirect, integ.attnforge_mask),
    "kprep": (v_kprep, integ.attnforge_mask),
    "afk": (integ.attnforge_attention, integ.attnforge_mask),  # the optimizer with kernels on (see switch)
    "direct": (v_direct, integ.attnforge_mask),
    "pchk": (v_pchk, integ.attnforge_mask),
    "planned": (v_planned, integ.attnforge_mask),
    "pchk_note": (v_pchk_note, integ.attnforge_mask),
    "pchk_align": (v_pchk_align, integ.attnforge_mask),
    "pass": (v_pass, sdpa_mask),
    "align": (v_align, sdpa_mask),
    "decide": (v_decide, sdpa_mask),
    "tuple": (v_decide_only_lookup, sdpa_mask),
    "afattn": (integ.attnforge_attention, sdpa_mask),
    "afmask": (v_pass, integ.attnforge_mask),
    "af": (integ.attnforge_attention, integ.attnforge_mask),
}


def timed(fn, label):
    def wrapper(module, q, k, v, mask, *a, **kw):
        t = time.perf_counter_ns()
        out = fn(module, q, k, v, mask, *a, **kw)
        TIMES[label].append(time.perf_counter_ns() - t)
        return out

    return wrapper


def timed_mask(fn, label):
    def wrapper(*a, **kw):
        t = time.perf_counter_ns()
        out = fn(*a, **kw)
        TIMES["mask:" + label].append(time.perf_counter_ns() - t)
        return out

    return wrapper


for vname, (attn, maskfn) in VARIANTS.items():
    AttentionInterface.register("x_" + vname, attn)
    AttentionMaskInterface.register("x_" + vname, maskfn)
    AttentionInterface.register("t_" + vname, timed(attn, vname))
    AttentionMaskInterface.register("t_" + vname, timed_mask(maskfn, vname))
AttentionInterface.register("t_sdpa", timed(sdpa_attention_forward, "sdpa"))
AttentionMaskInterface.register("t_sdpa", timed_mask(sdpa_mask, "sdpa"))
_fwd = m.forward


def timed_forward(*a, **kw):
    t = time.perf_counter_ns()
    out = _fwd(*a, **kw)
    if (
        TIMING[0]
        and kw.get("input_ids", a[0] if a else None) is not None
        and (kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1] == 1
    ):
        TIMES["fwd:" + TIMING[1]].append(time.perf_counter_ns() - t)
    return out


TIMING.append(None)

SIDES = ["sdpa"] + [s for s in os.environ.get("SIDES", ",".join(VARIANTS)).split(",") if s]
impl = {s: ("sdpa" if s == "sdpa" else "x_" + s) for s in SIDES}
ids = torch.randint(3, 30000, (1, 512), device=DEV)
dev_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
print(dev_name, torch.__version__, name, flush=True)


def run_round_robin(order):
    turns = itertools.cycle(order)
    owners = []

    def switch(_=None):
        s = next(turns)
        owners.append(s)
        TIMING[1] = s
        kernels = ("decode", "prefill") if s == "afk" else ()
        if opt.settings.kernels != kernels:  # "afk": kernels run wherever they take the call
            af.configure_optimizer(kernels=kernels, require_measurement=not kernels)
        m.set_attn_implementation(impl[s])

    switch()
    clock = TokenClock(_sync_for(ids), on_token=switch)
    with torch.inference_mode():
        m.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    steps = clock.step_ms()  # step i run by owners[i + 1]
    return list(zip(owners[1:], steps, strict=False))


per = collections.defaultdict(list)
run_round_robin(SIDES)  # warm-up
for r in range(RUNS):
    order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
    if r % 2:
        order = order[::-1]
    for s, ms in run_round_robin(order):
        per[s].append(ms)
base = statistics.median(per["sdpa"])
rows = {}
for s in SIDES:
    med = statistics.median(per[s])
    rows[s] = {
        "median_ms": med,
        "mean_ms": statistics.fmean(per[s]),
        "n": len(per[s]),
        "ratio_tok_s": base / med,
    }
    print(
        f"[step] {s:7s} median {med:.3f} ms  mean {statistics.fmean(per[s]):.3f}  "
        f"tok/s vs sdpa {base / med:.3f}  n={len(per[s])}",
        flush=True,
    )

# Part 2: in-place cost of each hook (the whole function, including sdpa_attention_forward), round robin
timp = {s: "t_" + s for s in SIDES}
impl.update(timp)
m.forward = timed_forward
TIMING[0] = True
for r in range(max(RUNS // 2, 2)):
    run_round_robin(SIDES if r % 2 == 0 else SIDES[::-1])
t2 = {}
for s in SIDES:
    v = TIMES[s]
    t2[s] = {
        "median_us": statistics.median(v) / 1e3,
        "p90_us": sorted(v)[int(0.9 * len(v))] / 1e3,
        "n": len(v),
    }
    print(
        f"[call] {s:7s} median {t2[s]['median_us']:.1f} us  p90 {t2[s]['p90_us']:.1f} us  n={len(v)}",
        flush=True,
    )
for s in SIDES:
    for kind in ("mask", "fwd"):
        v = TIMES[f"{kind}:{s}"]
        if v:
            t2[f"{kind}:{s}"] = {"median_us": statistics.median(v) / 1e3, "n": len(v)}
            print(f"[{kind}] {s:10s} median {statistics.median(v) / 1e3:.1f} us  n={len(v)}", flush=True)
m.forward = _fwd
hits = collections.Counter()
real = integ.planned_decode


def counting(*a):
    out = real(*a)
    hits["hit" if out is not None else "miss"] += 1
    return out


integ.planned_decode = counting
impl["af"] = "x_af"
run_round_robin(["af"])
integ.planned_decode = real
print("[plan] af side:", dict(hits), flush=True)
with open(f"{OUT}/diag-hook-{name}.json", "w") as file:
    json.dump(
        {
            "device": dev_name,
            "torch": torch.__version__,
            "model": name,
            "runs": RUNS,
            "new": NEW,
            "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"),
            "steps": rows,
            "calls": t2,
            "raw_steps": {s: per[s] for s in SIDES},
        },
        file,
        indent=1,
    )
