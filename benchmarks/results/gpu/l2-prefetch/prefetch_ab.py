"""Issue 11 probe (scratch, kept with its results): decode-step variants of the products' launches, A/B in
one process on one model (random weights, bf16, batch 1):
  - "base": the defaults; "torch-argmax": the greedy argmax by torch's reduction, not `kernels.argmax`;
  - "all<MiB>": every product's first programs ask L2 for the first <MiB> of its weight before their PDL wait
    (`GemvParams.prefetch`), while the kernel before it runs; "o<MiB>": only the product after attention
    (o_proj, which waits while attention leaves DRAM mostly idle at 4k keys);
  - "ahead2": products that read slices one step ahead read them two steps ahead, the first two slices
    before the PDL wait (`GemvParams(ahead=2)`).
One accelerator per variant, each capturing its decode graph with its setting; then generations interleaved
round by round after a warm-up round (prompts 128 and 4096, 256 new tokens): per variant and prompt the
median decode tok/s, and whether the greedy tokens equal the first variant's (none may change them).

    PYTHONPATH=src python prefetch_ab.py OUT.json [model=llama3-8b] [variants=torch-argmax,base,all8] [runs=3]

The first run (commit 307a653, variants torch-argmax,all0,all8,all16,all32) wrote budgets as "prefetch-<MiB>".
Writes OUT.json after every round and prints a table at the end.
"""

import json
import os
import statistics
import sys
from dataclasses import replace

import torch

from attnforge import models
from attnforge.accel import accelerate, sampling
from attnforge.environment import environment_report
from attnforge.kernels import gemv

NEW = 256
PROMPTS = (128, 4096)


def tiles_for(variant: str, o_proj: tuple[int, int], defaults=gemv.default_params):
    """The variant's launch parameters: `gemv.default_params`' changed as the variant says."""

    def params(rows, n, k, bits=16):
        tiles = defaults(rows, n, k, bits)
        if variant == "ahead2" and tiles.ahead:
            return replace(tiles, ahead=2)
        for prefix, wanted in (("all", True), ("o", (n, k) == o_proj)):
            if variant.startswith(prefix) and variant[len(prefix) :].isdigit() and wanted:
                return replace(tiles, prefetch=int(variant[len(prefix) :]) << 20)
        return tiles

    return params


def build(model, variant: str, max_seq_len: int, o_proj: tuple[int, int]):
    """An accelerator whose decode graph was captured with the variant's settings."""
    original, defaults = sampling.first_max, gemv.default_params
    gemv.default_params = tiles_for(variant, o_proj)
    if variant == "torch-argmax":
        sampling.first_max = lambda scores: scores.argmax(dim=-1)
    try:
        acc = accelerate(model, max_batch_size=1, max_seq_len=max_seq_len)
        acc.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)  # compiles and captures
    finally:
        gemv.default_params, sampling.first_max = defaults, original
    return acc


def main(path: str, model_name: str, variants: list[str], runs: int) -> None:
    model = models.load_model(model_name, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    o_proj = (config.hidden_size, config.num_attention_heads * head_dim)
    accs = {name: build(model, name, max(PROMPTS) + NEW, o_proj) for name in variants}
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
    variants = options.get("variants", "torch-argmax,base,all8").split(",")
    main(sys.argv[1], options.get("model", "llama3-8b"), variants, int(options.get("runs", 3)))
