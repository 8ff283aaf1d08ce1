"""Issue 11 diagnosis (scratch, kept with its results): where a decode step of the accelerator spends its GPU
time. Qwen3-0.6B (or another bundled architecture), random weights, bf16, batch 1 (or `batch=N`: prompts of
PROMPT * (i + 1) / N tokens, as `bench accel --batch` spreads them), optionally quantized with a recipe on a
quant backend ("triton" unless `backend=`; issue 15); run from the repository root with PYTHONPATH=src:

    python prof_accel.py OUT_DIR [PROMPT] [tune] [model=llama3-8b] [recipe=speed-4bit] [backend=tinygemm]
        [batch=8] [fast_rows=8]
    # tune: inductor's coordinate-descent tuning on; fast_rows: gemv.fast_rows for this run (up to that many
    # rows the decode step's products go through fused_linear, neighbours fused)

One warm-up generation (compiles, captures), then torch.profiler around a generation of 64 new tokens: the
GPU kernels by total time, their count per decode step, the step's GPU time against its wall time, and its
shares (products, attention, the rest) per step: as the profiler gives each kernel's duration, and on the
GPU timeline with nothing counted twice (kernels launched early with PDL wait inside themselves); and each
kernel of a step by its position there (which product, which layer: `step_positions`).
"""

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from attnforge import models
from attnforge.accel import accelerate
from attnforge.kernels import gemv

NEW = 64


# kernel-name fragments per share of the step (the first that matches; the rest is "other")
SHARES = (("products", ("gemv", "_swap_kernel", "gemm", "cutlass", "int4pack", "cublas", "matmul", "xmma",
                         "nvjet")),
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


# a decode step ends with its greedy choice: torch's argmax reduction or `kernels.argmax`'s second launch
STEP_END = ("ArgMax", "_pick_kernel")


def by_position(intervals: list[tuple[float, float, str]]) -> list[dict]:
    """The decode steps' kernels by their position in a step (steps split after each STEP_END kernel; only
    steps with the most common kernel count, whose positions line up): per position the kernel's name, its
    mean duration and its mean exclusive time (as `exclusive_us`: what it alone adds to the timeline), us."""
    steps, current, reached = [], [], float("-inf")
    for start, end, name in sorted(intervals):
        current.append((name, end - start, max(0.0, end - max(start, reached))))
        reached = max(reached, end)
        if any(part in name for part in STEP_END):
            steps.append(current)
            current = []
    if not steps:
        return []
    counts = [len(step) for step in steps]
    common = max(set(counts), key=counts.count)
    steps = [step for step in steps if len(step) == common]
    return [{"position": i, "name": steps[0][i][0][:80], "steps": len(steps),
             "mean_us": sum(step[i][1] for step in steps) / len(steps),
             "mean_exclusive_us": sum(step[i][2] for step in steps) / len(steps)}
            for i in range(common)]  # fmt: skip


def main(out_dir, prompt_len, tune=False, model_name="qwen3-0.6b", recipe=None, backend="triton", batch=1,
         fast_rows=None):  # fmt: skip
    if fast_rows is not None:
        gemv.fast_rows = lambda device, dtype: fast_rows
    model = models.load_model(model_name, dtype=torch.bfloat16, attn_implementation="sdpa")
    if recipe:
        import attnforge as af

        af.quantize(model, recipe, 64, backend=backend)
    acc = accelerate(model, max_batch_size=batch, max_seq_len=prompt_len + NEW + 8, tune=tune)
    lengths = [max(1, prompt_len * (b + 1) // batch) for b in range(batch)]
    prompt = [[(7 * i + 3 + b) % model.config.vocab_size for i in range(n)] for b, n in enumerate(lengths)]
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
    doc.update(tune=tune, model=model_name, recipe=recipe, backend=backend if recipe else None, batch=batch,
               fast_rows=gemv.fast_rows(torch.device("cuda"), torch.bfloat16),
               shares_us_per_step=shares(kernels, steps),
               shares_exclusive_us_per_step=shares({n: (0, t) for n, t in alone.items()}, steps),
               exclusive_us={n[:160]: t for n, t in sorted(alone.items(), key=lambda kv: -kv[1])},
               step_positions=by_position(intervals))  # fmt: skip
    quant = f"-{recipe}-{backend}" if recipe else ""
    shape = (f"-b{batch}" if batch > 1 else "") + (f"-fast{fast_rows}" if fast_rows is not None else "")
    name = f"prof-accel-{model_name}{quant}-p{prompt_len}{shape}{'-tune' if tune else ''}.json"
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
    positions = doc["step_positions"]
    if positions:
        print(f"a step's {len(positions)} kernels by position ({positions[0]['steps']} steps), mean us and "
              "mean exclusive us; per layer, from each attention kernel on:")  # fmt: skip
        for offset, (mean, alone, name) in layer_slots(positions).items():
            print(f"  +{offset} {mean:8.2f} {alone:8.2f}  {name}")
        for row in positions[-4:]:
            mean, alone = row["mean_us"], row["mean_exclusive_us"]
            print(f"  {row['position']:4d} {mean:8.2f} {alone:8.2f}  {row['name']}")


def layer_slots(positions: list[dict]) -> dict:
    """`by_position`'s rows averaged over the layers but the last (whose period ends in the LM head): offset
    from each attention ("decode") kernel (the period: the distance between the first two) -> (mean us, mean
    exclusive us, name)."""
    starts = [row["position"] for row in positions if "decode" in row["name"]]
    if len(starts) < 2:
        return {}
    period = starts[1] - starts[0]
    slots = {}
    for offset in range(period):
        rows = [positions[s + offset] for s in starts[:-1]]
        slots[offset] = (sum(r["mean_us"] for r in rows) / len(rows),
                         sum(r["mean_exclusive_us"] for r in rows) / len(rows), rows[0]["name"])  # fmt: skip
    return slots


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[3:] if "=" in arg)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128, "tune" in sys.argv[3:],
         options.get("model", "qwen3-0.6b"), options.get("recipe"),
         options.get("backend", "triton"), int(options.get("batch", 1)),
         int(options["fast_rows"]) if "fast_rows" in options else None)  # fmt: skip
