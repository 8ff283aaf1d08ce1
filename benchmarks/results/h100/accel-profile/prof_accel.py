"""Issue 11 diagnosis (scratch, kept with its results): where a decode step of the accelerator spends its GPU
time. Qwen3-0.6B (or another bundled architecture), random weights, bf16, batch 1, optionally quantized with
a recipe on a quant backend ("triton" unless `backend=`; issue 15); run from the repository root with
PYTHONPATH=src:

    python prof_accel.py OUT_DIR [PROMPT] [tune] [model=llama3-8b] [recipe=speed-4bit] [backend=tinygemm]
    # tune: inductor's coordinate-descent tuning on

One warm-up generation (compiles, captures), then torch.profiler around a generation of 64 new tokens: the
GPU kernels by total time, their count per decode step, the step's GPU time against its wall time, and its
shares (products, attention, the rest) per step: as the profiler gives each kernel's duration, and on the
GPU timeline with nothing counted twice (kernels launched early with PDL wait inside themselves).
"""

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from attnforge import models
from attnforge.accel import accelerate

NEW = 64


# kernel-name fragments per share of the step (the first that matches; the rest is "other")
SHARES = (("products", ("gemv", "gemm", "cutlass", "int4pack", "cublas", "matmul", "xmma", "nvjet")),
          ("attention", ("decode", "prefill", "flash", "attention", "rope")))  # fmt: skip


def shares(kernels: dict, steps: int) -> dict:
    """us per step of each share (SHARES) of the profiled kernels' time."""
    out = {name: 0.0 for name, _ in SHARES} | {"other": 0.0}
    for kernel, (_, total) in kernels.items():
        share = next((n for n, parts in SHARES if any(p in kernel.lower() for p in parts)), "other")
        out[share] += total / steps
    return out


def exclusive_us(intervals: list[tuple[float, float, str]]) -> dict:
    """Per kernel name, the time of the GPU timeline it alone accounts for: kernels sorted by start, each
    counted from where the ones before it ended (a kernel launched early with PDL waits inside itself for
    the one before; its own duration would count that wait twice)."""
    out, reached = {}, float("-inf")
    for start, end, name in sorted(intervals):
        out[name] = out.get(name, 0.0) + max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return out


def main(out_dir, prompt_len, tune=False, model_name="qwen3-0.6b", recipe=None, backend="triton"):
    model = models.load_model(model_name, dtype=torch.bfloat16, attn_implementation="sdpa")
    if recipe:
        import attnforge as af

        af.quantize(model, recipe, 64, backend=backend)
    acc = accelerate(model, max_batch_size=1, max_seq_len=prompt_len + NEW + 8, tune=tune)
    prompt = [[(7 * i + 3) % model.config.vocab_size for i in range(prompt_len)]]
    acc.generate(prompt, max_new_tokens=NEW, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = acc.generate(prompt, max_new_tokens=NEW, ignore_eos=True)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        acc.generate(prompt, max_new_tokens=NEW, ignore_eos=True)
        torch.cuda.synchronize()
    kernels, intervals = {}, []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            intervals.append((e.time_range.start, e.time_range.end, e.name))
    alone = exclusive_us(intervals)
    steps = NEW - 1
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    total_us = sum(v[1] for v in kernels.values())
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"), "prompt": prompt_len, "new": NEW,
           "decode_tok_s": result.metrics.decode_tok_s if hasattr(result.metrics, "decode_tok_s") else None,
           "wall_s_unprofiled": wall, "gpu_kernel_us_total": total_us,
           "info": {k: str(v) for k, v in getattr(acc, "info", {}).items()},
           "kernels": [{"name": n[:160], "count": c, "total_us": t} for n, (c, t) in rows]}  # fmt: skip
    doc.update(tune=tune, model=model_name, recipe=recipe, backend=backend if recipe else None,
               shares_us_per_step=shares(kernels, steps),
               shares_exclusive_us_per_step=shares({n: (0, t) for n, t in alone.items()}, steps),
               exclusive_us={n[:160]: t for n, t in sorted(alone.items(), key=lambda kv: -kv[1])},
               )  # fmt: skip
    quant = f"-{recipe}-{backend}" if recipe else ""
    name = f"prof-accel-{model_name}{quant}-p{prompt_len}{'-tune' if tune else ''}.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"decode {result.metrics.decode_tok_s:.1f} tok/s")
    print(f"wall {wall * 1e3:.1f} ms for {NEW} tokens; GPU kernel time {total_us / 1e3:.1f} ms in "
          f"{sum(v[0] for v in kernels.values())} kernels ({sum(v[0] for v in kernels.values()) / steps:.0f}"
          f" per step if all were decode)")  # fmt: skip
    print("us per step: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["shares_us_per_step"].items()))
    print("us per step, timeline (no overlap counted twice): "
          + ", ".join(f"{k} {v:.1f}" for k, v in doc["shares_exclusive_us_per_step"].items()))  # fmt: skip
    for name, (count, t) in rows[:45]:
        print(f"{t / steps:8.1f} us/step {count / steps:6.1f}/step {t / max(count, 1):7.2f} us  {name[:110]}")


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[3:] if "=" in arg)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128, "tune" in sys.argv[3:],
         options.get("model", "qwen3-0.6b"), options.get("recipe"),
         options.get("backend", "triton"))  # fmt: skip
