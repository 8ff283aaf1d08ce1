"""Issue 14 probe (scratch, kept with its results): the persistent schedule of the Gluon prefill launch
against the one-tile launch. It ran once on an H100 with a kernel of its own (h100/prefill-gluon/runbook20-*,
ec17616: 3.5-4.5% faster than the one-tile st3-pp launch at 2k-8k, equal at 16k, slower on padded batches);
that kernel is the library's persistent schedule since 4e044cd (kernels/prefill_gluon.py,
`_persistent_kernel`: the same SASS instruction counts, cpu/prefill-gluon/compile-library-20261207.txt),
which this script now runs.

    python fa_gluon_persistent.py check            (GPU: against SDPA in float32 and the one-tile launch)
    python fa_gluon_persistent.py time <out.json>  (GPU: against SDPA, the stored launch and the one-tile
                                                     st3-pp, interleaved; padded batches too)
Offline SASS: compile_library.py. Results: benchmarks/results/h100/prefill-gluon/."""

import json
import math
import sys

import torch
import triton

from attnforge.kernels import prefill

ST3_PP = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, gluon=True, pingpong=True)


def attention(q, k, v, causal=True, kv_lens=None, q_lens=None, out=None):
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]` -> `[B, Hq, Lq, D]` through the persistent schedule."""
    out = torch.empty_like(q) if out is None else out
    params = dict(ST3_PP, persistent=True)
    prefill._prefill_into(q, k, v, out, q.shape[3] ** -0.5, causal, kv_lens, q_lens, None, params)
    return out


def _library(q, k, v, out, causal=True, kv_lens=None, q_lens=None):
    prefill._prefill_into(q, k, v, out, q.shape[3] ** -0.5, causal, kv_lens, q_lens, None, ST3_PP)
    return out


def check() -> bool:
    """Against SDPA in float32 (no lengths) and the library launch (bit for bit: the same per-tile work),
    with and without lengths, and 5 repeats bit for bit."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ok = True
    for b, hq, hkv, lq, lkv, d, lens in ((2, 8, 2, 1000, 1000, 128, None), (1, 4, 4, 300, 1300, 128, None),
                                         (2, 8, 8, 777, 777, 64, None), (4, 32, 8, 2048, 2048, 128, None),
                                         (3, 8, 2, 700, 700, 128, [700, 0, 129])):  # fmt: skip
        torch.manual_seed(lq)
        q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
        out = attention(q, k, v, kv_lens=lens_t, q_lens=lens_t, out=torch.full_like(q, math.nan))
        torch.cuda.synchronize()
        same_as_library = torch.equal(out, _library(q, k, v, torch.empty_like(q), True, lens_t, lens_t))
        repeats = all(torch.equal(attention(q, k, v, kv_lens=lens_t, q_lens=lens_t), out) for _ in range(5))
        err = 0.0
        if lens is None:
            kf, vf = (t.float().repeat_interleave(hq // hkv, 1) for t in (k, v))
            mask = torch.ones(lq, lkv, dtype=torch.bool, device="cuda").tril(lkv - lq)
            ref = sdpa(q.float(), kf, vf, attn_mask=mask)
            err = ((out.float() - ref).norm() / ref.norm()).item()
        row_ok = err < 1e-2 and same_as_library and repeats and bool(torch.isfinite(out).all())
        print({"shape": [b, hq, hkv, lq, lkv, d], "lens": lens, "rel_l2": err, "ok": row_ok,
               "same_as_library": same_as_library, "same_bits_5x": repeats}, flush=True)  # fmt: skip
        ok = ok and row_ok
    return ok


def _calls(q, k, v, out, lens=None, extra=None) -> dict:
    """SDPA (without lengths), the launch the tuning table stores for the call, the library's st3-pp and the
    persistent launch."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {} if lens is not None else {"sdpa-gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)}
    return {**calls, "stored": lambda: prefill.prefill_attention(q, k, v, kv_lens=lens, q_lens=lens, out=out),
            "library-st3-pp": lambda: _library(q, k, v, out, True, lens, lens),
            "persistent-st3-pp": lambda: attention(q, k, v, kv_lens=lens, q_lens=lens, out=out),
            **{name: (lambda f=f: f(q, k, v, kv_lens=lens, q_lens=lens, out=out))
               for name, f in (extra or {}).items()}}  # fmt: skip


# (batch, length, valid lengths or None): causal 32:8 d128; the padded rows are the prefill grid's shapes
TIME_ROWS = ((8, 2048, None), (4, 4096, None), (2, 8192, None), (1, 16384, None), (32, 512, None),
             (8, 2048, (2048, 1900, 1500, 1024, 777, 512, 300, 2000)),
             (16, 1024, (1024, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 1024, 999, 513,
                         257)))  # fmt: skip


def time_rows(path: str, extra: dict | None = None) -> None:
    """Each TIME_ROWS row's calls (`_calls`, and `extra`: name -> attention-like function) interleaved."""
    from attnforge.bench.timing import summarize, time_interleaved

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}  # fmt: skip
    for batch, length, valid in TIME_ROWS:
        q = torch.randn(batch, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = None if valid is None else torch.tensor(valid, dtype=torch.int32, device="cuda")
        calls = _calls(q, k, v, torch.empty_like(q), lens, extra)
        flops = sum(4 * 32 * n * n / 2 * 128 for n in (valid or [length] * batch))
        label = f"B={batch} 32:8 L={length}{' padded' if valid else ''}"
        for name, samples in time_interleaved(calls, reps=20).items():
            us = summarize(samples)["median_us"]
            doc["rows"].append(dict(batch=batch, length=length, valid=valid, call=name, us=us,
                                    tflops=flops / us / 1e6))  # fmt: skip
            print(f"{label} {name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s", flush=True)
            with open(path, "w") as fh:
                json.dump(doc, fh, indent=1)


def main() -> None:
    if sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    time_rows(sys.argv[2])


if __name__ == "__main__":
    main()
