"""Prefill attention on the GPU: correctness first, then timing against torch (issue 4).

    PYTHONPATH=src python3 benchmarks/bench_prefill.py --mode grid --out DIR  # check + time issue 4's grid
    PYTHONPATH=src python3 benchmarks/bench_prefill.py --mode tune --out DIR  # launch-parameter sweep only
    PYTHONPATH=src python3 benchmarks/bench_prefill.py --mode all  --out DIR  # sweep, then the grid with it

Correctness: the protocol cases (float64 oracle, NaN-prefilled out=) over head dims, dtypes, odd sizes,
padding and masks; then, for every grid configuration, attnforge and every torch baseline are checked on
the same case at that configuration's lengths, head_dim and GQA group with one KV head (the float64 oracle
of 32 heads at 16k would need ~100 GB); at full size each baseline is also compared with attnforge. A
baseline that raises or disagrees is marked (unsupported / wrong) and not timed.
Timing (DESIGN.md): CUDA events, cold L2 (256 MB written before every call), providers interleaved, median.
TFLOP/s count 4*D FLOPs per visible (query, key) pair: causal FLOPs are halved.
Inputs are random; speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnforge import verify
from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import prefill as prefill_mod
from attnforge.kernels import reference, tuning
from attnforge.kernels.prefill import prefill_attention

DTYPE = torch.bfloat16
DEVICE = "cuda"  # tests of this script's logic set "cpu" (TRITON_INTERPRET=1)
DATE = "20261122"
TUNING_SOURCE = f"benchmarks/results/h100/prefill-{DATE}.json"


def log(*args) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------------------------
# The grid of issue 4


@dataclass
class Config:
    """One benchmark configuration. kind: 'causal' (Lq = Lkv), 'chunked' (Lq < Lkv), 'padded' (q_lens)."""

    kind: str
    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    lens: list[int] | None = None  # padded: valid length of each sequence (queries = keys)
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def name(self) -> str:
        heads = f"{self.num_heads}:{self.num_kv_heads} d{self.head_dim}"
        if self.kind == "causal":
            return f"causal B={self.batch} L={self.q_len} {heads}"
        if self.kind == "chunked":
            return f"chunked B={self.batch} new={self.q_len} cached={self.kv_len - self.q_len} {heads}"
        return f"padded B={self.batch} Lmax={self.q_len} {heads}"

    def pairs(self) -> float:
        """Visible (query, key) pairs, causal halved (L^2/2 per square block)."""
        if self.kind == "padded":
            return self.num_heads * sum(n * n / 2 for n in self.lens)
        per_head = self.q_len * (self.kv_len - self.q_len) + self.q_len * self.q_len / 2
        return self.batch * self.num_heads * per_head

    def flops(self) -> float:
        return 4.0 * self.head_dim * self.pairs()


def grid_configs() -> list[Config]:
    """Issue 4's grid, the configurations its targets name first (a run cut short keeps those)."""
    configs = []
    for (hq, hkv, d), length in itertools.product(
        ((32, 8, 128), (16, 8, 128), (32, 32, 64)), (512, 1024, 2048, 4096, 8192, 16384)
    ):
        configs.append(Config("causal", 16384 // length, hq, hkv, length, length, d))
    for new, cached in itertools.product((512, 2048), (4096, 16384, 32768)):
        configs.append(Config("chunked", 1, 32, 8, new, cached + new, 128))
    gen = torch.Generator().manual_seed(4)
    for batch, lmax in ((8, 2048), (16, 1024)):
        lens = torch.randint(lmax // 8, lmax + 1, (batch,), generator=gen).tolist()
        lens[0] = lmax
        configs.append(Config("padded", batch, 32, 8, lmax, lmax, 128, lens=lens))
    first = [c for c in configs if c.kind == "causal" and c.head_dim == 128 and c.num_heads == 32]
    return first + [c for c in configs if c.kind != "causal"] + [c for c in configs if c not in first and
                                                                 c.kind == "causal"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Inputs and providers. A provider factory takes (q, k, v, options) and returns a no-argument call; the same
# factory serves the correctness check (verify.check) and the timing.


def make_inputs(cfg: Config, *, num_heads=None, num_kv_heads=None, batch=None, dtype=DTYPE, seed=0):
    """q, k, v (random, with NaN/Inf poison beyond the valid lengths of a padded batch) and the options."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, b = num_heads or cfg.num_heads, num_kv_heads or cfg.num_kv_heads, batch or cfg.batch
    shape = verify.Shape(b, hq, hkv, cfg.q_len, cfg.kv_len, cfg.head_dim)
    case = verify.random_case(shape, dtype=dtype, device=DEVICE, causal=True, generator=gen)
    if cfg.kind == "padded":
        lens = torch.tensor(cfg.lens[:b], dtype=torch.int32, device=DEVICE)
        case.kv_lens, case.q_lens = lens, lens
        for bi, end in enumerate(cfg.lens[:b]):
            for t in (case.k, case.v):
                t[bi, :, end::2] = math.nan
                t[bi, :, end + 1 :: 2] = math.inf
    return case


def _valid_query_rows(out, q_lens):
    """torch leaves padded query rows NaN or garbage; attnforge's convention (and the oracle's) is 0."""
    if q_lens is None:
        return out
    rows = torch.arange(out.shape[2], device=out.device)
    return out.masked_fill((rows[None, :] >= q_lens[:, None].to(out.device))[:, None, :, None], 0.0)


def _zero_padding(k, kv_lens):
    """A copy of k/v with the padding zeroed: torch's masked kernels still multiply padded keys, and NaN there
    poisons every row (0 * NaN). Users of those paths keep zeros in their padding; the copy is untimed."""
    if kv_lens is None:
        return k
    keys = torch.arange(k.shape[2], device=k.device)
    return k.masked_fill((keys[None, :] >= kv_lens[:, None])[:, None, :, None], 0.0)


def attnforge_provider(q, k, v, opts):
    return lambda: prefill_attention(q, k, v, **opts)


def attnforge_mask_provider(q, k, v, opts):
    """attnforge given a bool mask (what transformers passes) instead of lengths; with no lengths to go by, it
    reads the padding, which holds zeros here as in transformers' caches (copy untimed)."""
    batch, _, q_len, _ = q.shape
    k, v = _zero_padding(k, opts.get("kv_lens")), _zero_padding(v, opts.get("kv_lens"))
    mask = reference.visibility_mask(batch, q_len, k.shape[2], causal=True, kv_lens=opts.get("kv_lens"),
                                     q_lens=opts.get("q_lens"), device=q.device)  # fmt: skip
    return lambda: prefill_attention(q, k, v, causal=False, attn_mask=mask, scale=opts.get("scale"))


def _repeat(k, group):
    return k.repeat_interleave(group, dim=1)


def sdpa_provider(backend: SDPBackend, *, repeat: bool, how: str):
    """torch SDPA on one backend. how: 'is_causal' (square only: torch's top-left equals bottom-right there),
    'lower_right' (torch.nn.attention.bias.causal_lower_right), 'mask' (an explicit bool mask, as
    transformers builds). repeat: K/V repeated per query head inside the timed call (transformers'
    repeat_kv) instead of enable_gqa."""

    def factory(q, k, v, opts):
        kv_lens, q_lens = opts.get("kv_lens"), opts.get("q_lens")
        group = q.shape[1] // k.shape[1]
        if kv_lens is not None:
            k, v = _zero_padding(k, kv_lens), _zero_padding(v, kv_lens)
        kwargs = {"scale": opts.get("scale")}
        if how == "is_causal":
            if q.shape[2] != k.shape[2] or kv_lens is not None:
                raise NotImplementedError("is_causal is top-left aligned: wrong unless Lq == Lkv, no padding")
            kwargs["is_causal"] = True
        elif how == "lower_right":
            if kv_lens is not None:
                raise NotImplementedError("causal_lower_right has no per-sequence lengths")
            from torch.nn.attention.bias import causal_lower_right

            kwargs["attn_mask"] = causal_lower_right(q.shape[2], k.shape[2])
        else:
            batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
            kwargs["attn_mask"] = reference.visibility_mask(
                batch, q_len, kv_len, causal=True, kv_lens=kv_lens, q_lens=q_lens, device=q.device
            )

        def call():
            with sdpa_kernel([backend]):
                if repeat:
                    return F.scaled_dot_product_attention(q, _repeat(k, group), _repeat(v, group), **kwargs)
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)

        return call

    return factory


def per_sequence_provider(q, k, v, opts):
    """torch flash (enable_gqa) once per sequence on its valid part: exact for a padded batch of prompts."""
    kv_lens, q_lens = opts.get("kv_lens"), opts.get("q_lens")
    if kv_lens is None or q_lens is None:
        raise NotImplementedError("per-sequence path is for padded batches")
    lens = kv_lens.tolist()
    if lens != q_lens.tolist():
        raise NotImplementedError("per-sequence path needs q_lens == kv_lens")
    out = torch.zeros_like(q)

    def call():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for b, n in enumerate(lens):
                out[b, :, :n] = F.scaled_dot_product_attention(
                    q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], is_causal=True,
                    enable_gqa=True, scale=opts.get("scale"),
                )[0]  # fmt: skip
        return out

    return call


def varlen_provider(q, k, v, opts):
    """torch.nn.attention.varlen (flash varlen) on packed [T, H, D] inputs; packing is untimed. Its keywords
    differ across torch versions: the causal and GQA forms are tried in turn (K/V heads repeated, untimed,
    where it takes no enable_gqa)."""
    from torch.nn.attention import varlen

    batch, num_heads, q_len, _ = q.shape
    group = num_heads // k.shape[1]
    q_lens, kv_lens = opts.get("q_lens"), opts.get("kv_lens")
    ql = q_lens.tolist() if q_lens is not None else [q_len] * batch
    kl = kv_lens.tolist() if kv_lens is not None else [k.shape[2]] * batch

    def pack(t, lens):
        return torch.cat([t[b, :, : lens[b]].transpose(0, 1) for b in range(batch)]).contiguous()

    qp, kp, vp = pack(q, ql), pack(k, kl), pack(v, kl)
    cu_q = torch.tensor([0, *itertools.accumulate(ql)], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, *itertools.accumulate(kl)], dtype=torch.int32, device=q.device)
    scale = {} if opts.get("scale") is None else {"scale": opts["scale"]}
    forms = [
        ({"is_causal": True, "enable_gqa": True}, False),
        ({"window_size": (-1, 0), "enable_gqa": True}, False),
        ({"is_causal": True}, True),
    ]
    for kwargs, repeat in forms:
        keys, values = (
            (kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)) if repeat else (kp, vp)
        )
        try:
            varlen.varlen_attn(qp, keys, values, cu_q, cu_k, max(ql), max(kl), **kwargs, **scale)
        except TypeError:
            continue
        break
    else:
        raise NotImplementedError("varlen_attn takes none of the causal keyword forms tried")
    out = torch.zeros_like(q)

    def call():
        return varlen.varlen_attn(qp, keys, values, cu_q, cu_k, max(ql), max(kl), **kwargs, **scale)

    def unpacked():
        result, start = call(), 0
        for b in range(batch):
            out[b, :, : ql[b]] = result[start : start + ql[b]].transpose(0, 1)
            start += ql[b]
        return out

    call.unpacked = unpacked
    return call


def providers_for(cfg: Config) -> dict:
    """Every provider that could give the right answer for this kind of configuration."""
    found = {"attnforge": attnforge_provider}
    if cfg.kind == "padded":
        found["attnforge(mask)"] = attnforge_mask_provider
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    how = {"causal": "is_causal", "chunked": "lower_right", "padded": "mask"}[cfg.kind]
    for name, backend in backends.items():
        if cfg.kind == "padded" and name == "flash":
            continue  # flash takes no mask
        if cfg.kind == "chunked" and name == "cudnn":
            found[f"{name}-mask-gqa"] = sdpa_provider(backend, repeat=False, how="mask")
            continue
        found[f"{name}-gqa"] = sdpa_provider(backend, repeat=False, how=how)
        if cfg.group > 1:
            found[f"{name}-repeat_kv"] = sdpa_provider(backend, repeat=True, how=how)
    if cfg.kind == "chunked":
        found["efficient-mask-repeat_kv"] = sdpa_provider(
            SDPBackend.EFFICIENT_ATTENTION, repeat=True, how="mask"
        )
    if cfg.kind == "padded":
        found["flash-per-sequence"] = per_sequence_provider
    if cfg.kind != "causal":
        found["flash-varlen"] = varlen_provider
    return found


def _opts(case) -> dict:
    opts = {"causal": True}
    if case.kv_lens is not None:
        opts["kv_lens"] = case.kv_lens
    if case.q_lens is not None:
        opts["q_lens"] = case.q_lens
    return opts


def _as_checked_fn(factory, is_torch: bool):
    def fn(q, k, v, **opts):
        call = factory(q, k, v, opts)
        out = call.unpacked() if hasattr(call, "unpacked") else call()
        return _valid_query_rows(out, opts.get("q_lens")) if is_torch else out

    return fn


def _rel_l2(a, b, q_lens=None) -> float:
    a = _valid_query_rows(a.float(), q_lens)
    b = _valid_query_rows(b.float(), q_lens)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------------------
# Correctness on the GPU


PROTOCOL_SHAPES = [
    # batch, Hq, Hkv, Lq, Lkv, D
    (2, 8, 2, 1000, 1000, 128),
    (1, 32, 8, 4097, 4097, 128),
    (2, 16, 16, 63, 65, 64),
    (3, 12, 4, 65, 1000, 80),
    (2, 8, 1, 7, 4097, 96),
    (2, 4, 2, 1000, 1000, 256),
    (1, 4, 1, 1, 1, 64),
    (2, 32, 8, 512, 4608, 128),
]


def protocol_correctness() -> list[dict]:
    rows = []

    def record(report):
        rows.append({"case": report.case, "passed": report.passed, "max_rel_l2": report.max_rel_l2,
                     "reason": report.reason})  # fmt: skip
        if not report.passed:
            log("  ", report)

    plan = [(s, torch.bfloat16) for s in PROTOCOL_SHAPES] + [
        (PROTOCOL_SHAPES[i], torch.float16) for i in (0, 3, 5)
    ]
    for (b, hq, hkv, lq, lkv, d), dtype in plan:
        shape = verify.Shape(b, hq, hkv, lq, lkv, d)
        for causal in (True, False):
            kinds = verify.CASE_KINDS if causal else ("random", "poisoned")
            for case in verify.protocol_cases(shape, dtype=dtype, device=DEVICE, causal=causal, kinds=kinds):
                record(verify.check(prefill_attention, case))
        case = verify.poisoned_case(shape, dtype=dtype, device=DEVICE, causal=True)
        case.q_lens = (
            torch.randint(0, lq + 1, (b,), dtype=torch.int32).clamp_max(case.kv_lens.cpu()).to(DEVICE)
        )
        record(verify.check(prefill_attention, case))
        for mask_kind in ("bool", "additive"):
            case = verify.random_case(shape, dtype=dtype, device=DEVICE, causal=True)
            keep = torch.rand(b, 1, lq, lkv, device=DEVICE) > 0.3
            keep[:, :, : max(1, lq // 4)] = False  # fully masked rows must come out 0
            additive = torch.randn(b, hq, lq, lkv, device=DEVICE).masked_fill(~keep, -math.inf)
            case.attn_mask = keep if mask_kind == "bool" else additive
            case.name = f"mask-{mask_kind}"
            record(verify.check(prefill_attention, case))
    # The TMA load path (picked per bucket by the sweep) on every bf16 shape, whatever the table says now.
    default_params = prefill_mod.launch_params
    prefill_mod.launch_params = lambda q, k, **kw: {**default_params(q, k, **kw), "tma": True}
    try:
        for b, hq, hkv, lq, lkv, d in PROTOCOL_SHAPES:
            shape = verify.Shape(b, hq, hkv, lq, lkv, d)
            for case in verify.protocol_cases(shape, dtype=torch.bfloat16, device=DEVICE, causal=True):
                case.name += "-tma"
                record(verify.check(prefill_attention, case))
    finally:
        prefill_mod.launch_params = default_params
    for b, hq, hkv, lq, lkv, d in (PROTOCOL_SHAPES[2], PROTOCOL_SHAPES[3]):
        shape = verify.Shape(b, hq, hkv, lq, lkv, d)
        for case in verify.protocol_cases(shape, dtype=torch.float32, device=DEVICE, causal=True):
            record(verify.check(prefill_attention, case))
    return rows


def grid_correctness(cfg: Config) -> tuple[dict, dict]:
    """Check every provider on a one-KV-head version of `cfg`, then compare baselines with attnforge at full
    size. Returns ({provider: status}, {provider: detail})."""
    status, detail = {}, {}
    batch = cfg.batch if cfg.kind == "padded" else min(cfg.batch, 2)
    small = make_inputs(cfg, num_heads=cfg.group, num_kv_heads=1, batch=batch, seed=1)
    one_group = verify.Shape(batch, cfg.group, 1, cfg.q_len, cfg.kv_len, cfg.head_dim)
    needle = verify.needle_case(one_group, position="last", dtype=DTYPE, device=DEVICE, causal=True)
    cases = [small] if cfg.kind == "padded" else [small, needle]
    full = make_inputs(cfg, seed=2)
    full_opts = _opts(full)
    reference_out = None
    for name, factory in providers_for(cfg).items():
        is_torch = not name.startswith("attnforge")
        try:
            reports = [verify.check(_as_checked_fn(factory, is_torch), case) for case in cases]
        except Exception as error:  # noqa: BLE001
            status[name], detail[name] = "unsupported", f"{type(error).__name__}: {error}"[:300]
            continue
        failed = [r for r in reports if not r.passed]
        if failed:
            reason = failed[0].reason
            status[name] = "unsupported" if "raised" in reason else "wrong"
            detail[name] = reason[:300]
            continue
        try:
            out = factory(full.q, full.k, full.v, full_opts)()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001
            status[name], detail[name] = "unsupported", f"full size: {type(error).__name__}: {error}"[:300]
            continue
        if name == "attnforge":
            reference_out = out
            status[name], detail[name] = "ok", "; ".join(r.reason for r in reports)
            continue
        err = _rel_l2(out, reference_out, full.q_lens) if reference_out is not None else math.nan
        if not err <= 2e-2:
            status[name], detail[name] = "wrong", f"full size differs from attnforge: rel L2 {err:.2e}"
            continue
        status[name], detail[name] = "ok", f"{reports[0].reason}; full size vs attnforge {err:.1e}"
        del out
    return status, detail


# ------------------------------------------------------------------------------------------------------------
# Timing


def time_config(cfg: Config, status: dict, reps: int) -> dict:
    case = make_inputs(cfg, seed=3)
    opts = _opts(case)
    calls = {}
    for name, factory in providers_for(cfg).items():
        if status.get(name) == "ok":
            calls[name] = factory(case.q, case.k, case.v, opts)
    samples = timing.time_interleaved(calls, reps=reps, warmup=5)
    flops = cfg.flops()
    result = {}
    for name, s in samples.items():
        summary = timing.summarize(s)
        result[name] = {**summary, "tflops": flops / (summary["median_us"] * 1e-6) / 1e12, "samples_us": s}
    return result


def _bucket(cfg: Config) -> str:
    padded = cfg.kind == "padded"
    shape = (cfg.batch, cfg.num_heads, cfg.q_len, cfg.kv_len, cfg.head_dim, DTYPE)
    return prefill_mod.prefill_bucket(*shape, has_kv_lens=padded, has_q_lens=padded)


def _launch_params(cfg: Config) -> dict:
    """What prefill_attention picks for this configuration (its lookup, without allocating the inputs)."""
    gpu, bucket = tuning.gpu_key(DEVICE), _bucket(cfg)
    tuned = tuning.launch_params("prefill", gpu, bucket) or tuning.launch_params(
        "prefill", gpu, bucket.removesuffix("-lens")
    )
    return tuned or prefill_mod.heuristic_params(
        cfg.batch, cfg.num_heads, cfg.q_len, cfg.head_dim, DTYPE, DEVICE
    )


def run_grid(configs: list[Config], reps: int, save=lambda rows: None, deadline=math.inf) -> list[dict]:
    rows = []
    for cfg in configs:
        t0 = time.time()
        if t0 > deadline:
            log(f"{cfg.name}: skipped, past --budget-s")
            continue
        status, detail = grid_correctness(cfg)
        timed = time_config(cfg, status, reps) if status.get("attnforge") == "ok" else {}
        torch_ok = {n: r for n, r in timed.items() if not n.startswith("attnforge")}
        best_torch = min(torch_ok, key=lambda n: torch_ok[n]["median_us"]) if torch_ok else None
        ours = timed.get("attnforge")
        row = {
            "config": cfg.name, "kind": cfg.kind, "batch": cfg.batch, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "q_len": cfg.q_len, "kv_len": cfg.kv_len,
            "head_dim": cfg.head_dim, "lens": cfg.lens, "flops": cfg.flops(),
            "bucket": _bucket(cfg),
            "launch_params": _launch_params(cfg),
            "status": status, "detail": detail, "timing": timed, "best_torch": best_torch,
        }  # fmt: skip
        if ours and best_torch:
            row["speedup_vs_best_torch"] = torch_ok[best_torch]["median_us"] / ours["median_us"]
            row["ratios"] = {n: r["median_us"] / ours["median_us"] for n, r in torch_ok.items()}
        rows.append(row)
        summary = "  ".join(f"{n}={r['tflops']:.0f}" for n, r in timed.items())
        bad = {n: s for n, s in status.items() if s != "ok"}
        log(f"{cfg.name}: {summary} TFLOP/s; not timed: {bad} ({time.time() - t0:.1f}s)")
        save(rows)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Launch-parameter sweep


SWEEP_SETS = [  # BLOCK_M, BLOCK_N, num_warps, num_stages, TMA loads
    (128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 3, False),
    (64, 64, 4, 3, True),
]  # fmt: skip
# Configurations the sweep times; every other configuration takes the winner of the nearest one.
SWEEP_CONFIGS = (
    "causal B=8 L=2048 32:8 d128", "causal B=2 L=8192 32:8 d128", "causal B=4 L=4096 32:32 d64",
    "chunked B=1 new=512 cached=16384 32:8 d128",
)  # fmt: skip


def sweep_space(head_dim: int) -> list[dict]:
    """The sweep's launch-parameter sets that fit in shared memory for this head_dim."""
    d_block = 1 << (head_dim - 1).bit_length()
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "tma": tma}
        for bm, bn, warps, stages, tma in SWEEP_SETS
        if 2 * (bm * d_block + stages * 2 * bn * d_block) <= 220 * 1024
    ]


def _nearest(cfg: Config, measured: list[Config]) -> Config | None:
    kind = "causal" if cfg.kind == "padded" else cfg.kind
    same = [m for m in measured if m.head_dim == cfg.head_dim and m.kind == kind] or [
        m for m in measured if m.head_dim == cfg.head_dim
    ]
    return min(same, key=lambda m: abs(math.log2(m.q_len / cfg.q_len)), default=None)


def run_sweep(configs: list[Config], reps: int, names=SWEEP_CONFIGS) -> tuple[dict, list[dict]]:
    """Time every launch-parameter set on the SWEEP_CONFIGS; each configuration's bucket gets the winner of
    the nearest swept configuration (same head_dim and kind, closest query length)."""
    measured = [c for c in configs if c.name in names]
    best_for, rows = {}, []
    for cfg in measured:
        t0 = time.time()
        space = sweep_space(cfg.head_dim)
        case = make_inputs(cfg, seed=5)
        opts = _opts(case)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        calls = {}
        for i, params in enumerate(space):
            out = torch.empty_like(case.q)

            def call(params=params, out=out, case=case, scale=scale, opts=opts):
                lens = (opts.get("kv_lens"), opts.get("q_lens"))
                prefill_mod._prefill_into(
                    case.q, case.k, case.v, out, scale, True, *lens, None, params=params
                )
                return out

            try:
                call()
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory
                rows.append({"config": cfg.name, "params": params,
                             "error": f"{type(error).__name__}: {str(error)[:200]}"})  # fmt: skip
                continue
            calls[i] = call
        samples = timing.time_interleaved({str(i): c for i, c in calls.items()}, reps=reps, warmup=2)
        medians = {i: statistics.median(samples[str(i)]) for i in calls}
        for i, median in medians.items():
            rows.append({"config": cfg.name, "params": space[i], "median_us": median,
                         "tflops": cfg.flops() / (median * 1e-6) / 1e12})  # fmt: skip
        best = min(medians, key=medians.get)
        best_for[cfg.name] = space[best]
        ranked = sorted(medians, key=medians.get)[:3]
        top = ", ".join(f"{space[i]} {cfg.flops() / medians[i] / 1e6:.0f}" for i in ranked)
        log(f"sweep {cfg.name}: top TFLOP/s {top} ({time.time() - t0:.0f}s)")
    winners = {}
    for cfg in configs:
        nearest = _nearest(cfg, measured)
        if nearest is not None:
            winners.setdefault(_bucket(cfg), best_for[nearest.name])
    return winners, rows


def install_winners(winners: dict, rows: list[dict] | None = None) -> dict:
    """Merge the sweep's winners into kernels/tuning.json (of this working copy) and reload the table, so the
    grid that follows runs with them. Speed-ups are filled from the grid rows when given."""
    table = json.loads(tuning.TABLE_PATH.read_text()) if tuning.TABLE_PATH.exists() else {}
    gpu = tuning.gpu_key(DEVICE)
    entries = table.setdefault(gpu, {}).setdefault("prefill", {})
    for bucket, params in winners.items():
        entry = {"params": params, "source": TUNING_SOURCE}
        if rows:
            speedups = [r["speedup_vs_best_torch"] for r in rows if r["bucket"] == bucket and
                        "speedup_vs_best_torch" in r]  # fmt: skip
            if speedups:
                entry["speedup"] = round(min(speedups), 3)
        entries[bucket] = entry
    tuning.TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tuning.load_table.cache_clear()
    return {gpu: {"prefill": entries}}


# ------------------------------------------------------------------------------------------------------------
# Reports


def markdown(env: dict, ceilings: dict, rows: list[dict]) -> str:
    lines = [
        f"# Prefill attention, {env.get('gpu')} ({DATE})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, driver {env.get('driver')}, commit "
        f"{(env.get('git_commit') or '?')[:10]}. Ceilings measured in this run: read "
        f"{ceilings['read_gbps']:.0f} GB/s, bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s.",
        "",
        "bf16, cold L2, median of interleaved runs. TFLOP/s count 4*D per visible (query, key) pair (causal "
        "halved). Speed-up: the fastest torch path that gave the right answer over attnforge. "
        "Random inputs; speed does not depend on their values. Where the speed-up is below 1, torch is "
        "faster: kernels/tuning.json records the measured speed-up per bucket and the optimizer routes those "
        "calls to torch SDPA.",
        "",
        "| config | attnforge TFLOP/s | % of matmul | fastest torch (TFLOP/s) | speed-up | others (TFLOP/s) "
        "| not timed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        timed = row["timing"]
        ours = timed.get("attnforge")
        best = row.get("best_torch")
        others = ", ".join(f"{n} {r['tflops']:.0f}" for n, r in timed.items() if n not in ("attnforge", best))
        skipped = ", ".join(f"{n}: {s}" for n, s in row["status"].items() if s != "ok")
        ours_text = f"{ours['tflops']:.0f}" if ours else "FAILED"
        share = f"{100 * ours['tflops'] / ceilings['bf16_tflops']:.0f}%" if ours else ""
        best_text = f"{best} ({timed[best]['tflops']:.0f})" if best else "none correct"
        speedup = f"{row['speedup_vs_best_torch']:.2f}x" if "speedup_vs_best_torch" in row else ""
        lines.append(
            f"| {row['config']} | {ours_text} | {share} | {best_text} | {speedup} | {others} | {skipped} |"
        )
    return "\n".join(lines) + "\n"


def short_table(rows: list[dict]) -> str:
    lines = [f"{'config':<44} {'ours':>6} {'best torch':>24} {'x':>6}  flash-gqa  cudnn-gqa"]
    for row in rows:
        t = row["timing"]

        def tf(name, t=t):
            return f"{t[name]['tflops']:.0f}" if name in t else "-"

        best = row.get("best_torch") or "-"
        speedup = f"{row.get('speedup_vs_best_torch', 0):.2f}"
        best_text = f"{best} {tf(best)}" if best != "-" else "-"
        lines.append(
            f"{row['config']:<44} {tf('attnforge'):>6} {best_text:>24} {speedup:>6}  "
            f"{tf('flash-gqa'):>9}  {tf('cudnn-gqa'):>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("grid", "tune", "all"), default="grid")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--tune-reps", type=int, default=10)
    parser.add_argument("--only", default="", help="run only configurations whose name contains this")
    parser.add_argument("--skip-protocol", action="store_true")
    parser.add_argument("--sweep-configs", default=",".join(SWEEP_CONFIGS), help="comma-separated names")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no grid config after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        log("bench_prefill needs a CUDA GPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = environment_report()
    env["tensor_descriptors"] = hasattr(tl, "make_tensor_descriptor")
    log(json.dumps({k: env.get(k) for k in ("gpu", "driver", "torch", "triton", "git_commit")}))
    configs = [c for c in grid_configs() if args.only in c.name]
    result = {"date": DATE, "environment": env, "args": vars(args) | {"out": str(args.out)}}

    def save(grid_rows=None):  # after every phase and grid row, so a run cut short still leaves its results
        if grid_rows is not None:
            result["grid"] = grid_rows
        result["wall_s"] = time.time() - started
        (args.out / f"prefill-{DATE}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    if not args.skip_protocol and args.mode != "tune":
        t0 = time.time()
        protocol = protocol_correctness()
        failed = [r for r in protocol if not r["passed"]]
        log(f"protocol: {len(protocol) - len(failed)}/{len(protocol)} passed ({time.time() - t0:.0f}s)")
        result["protocol"] = protocol
        save()

    if args.mode in ("tune", "all"):
        t0 = time.time()
        winners, sweep_rows = run_sweep(configs, args.tune_reps, args.sweep_configs.split(","))
        result["sweep"] = sweep_rows
        result["tuning"] = install_winners(winners)
        log(f"sweep done ({time.time() - t0:.0f}s)")
        (args.out / "tuning-prefill.json").write_text(json.dumps(result["tuning"], indent=2) + "\n")
        save()

    if args.mode in ("grid", "all"):
        result["ceilings"] = timing.ceilings()
        log(f"ceilings: {result['ceilings']}")
        rows = run_grid(configs, args.reps, save, started + args.budget_s)
        result["grid"] = rows
        if args.mode == "all":
            tuned = result["tuning"][tuning.gpu_key(DEVICE)]["prefill"]
            result["tuning"] = install_winners({b: e["params"] for b, e in tuned.items()}, rows)
        (args.out / f"prefill-{DATE}.md").write_text(markdown(env, result["ceilings"], rows))
    if "tuning" in result:
        (args.out / "tuning-prefill.json").write_text(json.dumps(result["tuning"], indent=2) + "\n")
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    save()
    if "grid" in result:
        log(short_table(result["grid"]))
    log(f"total {result['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
