"""Issue 11 probe (scratch, kept with its results): decode-step variants, A/B in one process on one model
(random weights, bf16, batch 1):
  - "base": the defaults; "torch-argmax": the greedy argmax by torch's reduction, not `kernels.argmax`;
  - "kv-prefetch": each program of the decode step's attention asks L2 for the first keys of its split (K and
    V) before its PDL wait, while the q/k/v product before it runs (the "prefetch" launch of
    `kernels.decode`, `split_kv.prefetch_split`), whatever the tuning entries say.
One accelerator per variant, each capturing its decode graph with its setting; then generations interleaved
round by round after a warm-up round (prompts 128 and 4096, 256 new tokens): per variant and prompt the
median decode tok/s, and whether the greedy tokens equal the first variant's (none may change them).

    PYTHONPATH=src python prefetch_ab.py OUT.json [model=llama3-8b] [variants=base,kv-prefetch] [runs=3]

Earlier runs timed the products' own L2 prefetch and slices read two steps ahead (`GemvParams.prefetch`,
`ahead=2`; commits 307a653 and ba98f76, variants "all<MiB>", "o<MiB>", "ahead2"): they lost on the H100 and
the H200 and were removed from the kernel after ba98f76; those variants run at that commit only.
Writes OUT.json after every round and prints a table at the end.
"""

import json
import os
import statistics
import sys

import torch

from attnforge import models
from attnforge.accel import accelerate, sampling
from attnforge.environment import environment_report
from attnforge.kernels import decode, decode_step

NEW = 256
PROMPTS = (128, 4096)


def prefetching(merged_in_kernel):
    """`decode.merged_in_kernel` (the decode step's launch) with the prefetch before the PDL wait on."""

    def launch(shape, num_kv_heads, kv_len, dtype, device):
        p = {**merged_in_kernel(shape, num_kv_heads, kv_len, dtype, device).params, "prefetch": True}
        return decode.DecodeLaunch(p, shape, num_kv_heads, dtype, device, True, False)

    return launch


def build(model, variant: str, max_seq_len: int):
    """An accelerator whose decode graph was captured with the variant's settings."""
    original, merged = sampling.first_max, decode_step.merged_in_kernel
    if variant == "kv-prefetch":
        decode_step.merged_in_kernel = prefetching(merged)
    if variant == "torch-argmax":
        sampling.first_max = lambda scores: scores.argmax(dim=-1)
    try:
        acc = accelerate(model, max_batch_size=1, max_seq_len=max_seq_len)
        acc.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)  # compiles and captures
    finally:
        decode_step.merged_in_kernel, sampling.first_max = merged, original
    return acc


def main(path: str, model_name: str, variants: list[str], runs: int) -> None:
    model = models.load_model(model_name, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = model.config
    accs = {name: build(model, name, max(PROMPTS) + NEW) for name in variants}
    doc = {"environment": environment_report(), "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"),
           "model": model_name, "new_tokens": NEW, "variants": variants, "runs": {}}  # fmt: skip
    first_tokens = {}
    for r in range(-1, runs):  # round -1 warms up (the first prefill of each length compiles)
        for prompt_len in PROMPTS:
            prompt = [[(7 * i + 3) % config.vocab_size for i in range(prompt_len)]]
            for name, acc in accs.items():
                result = acc.generate(prompt, max_new_tokens=NEW, ignore_eos=True)
                if r < 0:
                    continue
                tokens = result.tokens[0]
                same = first_tokens.setdefault(prompt_len, tokens) == tokens
                cell = doc["runs"].setdefault(f"{name} p{prompt_len}", {"tok_s": [], "same_tokens": []})
                cell["tok_s"].append(result.metrics.decode_tok_s)
                cell["same_tokens"].append(same)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
    for prompt_len in PROMPTS:
        base = statistics.median(doc["runs"][f"{variants[0]} p{prompt_len}"]["tok_s"])
        for name in accs:
            cell = doc["runs"][f"{name} p{prompt_len}"]
            cell["median_tok_s"] = med = statistics.median(cell["tok_s"])
            print(
                f"p{prompt_len:5d} {name:14s} {med:8.1f} tok/s  {med / base:.3f}x  runs "
                f"{', '.join(f'{v:.1f}' for v in cell['tok_s'])}  same tokens {all(cell['same_tokens'])}"
            )
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[2:] if "=" in arg)
    variants = options.get("variants", "base,kv-prefetch").split(",")
    main(sys.argv[1], options.get("model", "llama3-8b"), variants, int(options.get("runs", 3)))
