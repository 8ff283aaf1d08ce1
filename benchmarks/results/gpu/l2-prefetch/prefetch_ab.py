"""Issue 11 probe (scratch, kept with its results): the decode step with each product's first programs asking
L2 for the first bytes of its weight before their PDL wait (`GemvParams.prefetch`, `gemv.PREFETCH_BYTES`),
while the kernel before it (attention: DRAM mostly idle at 4k keys; or the previous product's tail) runs.
And the greedy argmax through `kernels.argmax` against torch's reduction.

One process, one model (random weights, bf16, batch 1); one accelerator per variant, each capturing its
decode graph with its setting; then generations interleaved round by round (prompts 128 and 4096, 256 new
tokens): per variant and prompt the median decode tok/s, and whether the greedy tokens equal the first
variant's (a prefetch is a hint: they must).

    PYTHONPATH=src python prefetch_ab.py OUT.json [model=llama3-8b] [budgets=0,8,16,32] [runs=3] [only=o]

Budgets in MiB; `only=o`: the prefetch only in the product after attention (o_proj, whose kernel runs while
DRAM is mostly idle), the other products without. Variants: "torch-argmax" (budget 0, torch's argmax) then
"prefetch-<MiB>" for each budget.
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


def build(model, budget_mib: int, torch_argmax: bool, max_seq_len: int, only: tuple | None):
    """An accelerator whose decode graph was captured with `budget_mib` of prefetch (only for products of
    (out, in) features `only` where given) and torch's argmax where asked."""
    original, defaults = sampling.first_max, gemv.default_params

    def params(rows, n, k, bits=16):
        tiles = gemv.default_tiles(rows, n, k, bits)
        wanted = budget_mib and (only is None or (n, k) == only)
        return replace(tiles, prefetch=budget_mib << 20) if wanted else tiles

    gemv.default_params = params
    if torch_argmax:
        sampling.first_max = lambda scores: scores.argmax(dim=-1)
    try:
        acc = accelerate(model, max_batch_size=1, max_seq_len=max_seq_len)
        acc.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)  # compiles and captures
    finally:
        gemv.default_params, sampling.first_max = defaults, original
    return acc


def main(path: str, model_name: str, budgets: list[int], runs: int, only_o: bool) -> None:
    model = models.load_model(model_name, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = model.config
    vocab, head_dim = config.vocab_size, getattr(config, "head_dim", None)
    head_dim = head_dim or config.hidden_size // config.num_attention_heads
    only = (config.hidden_size, config.num_attention_heads * head_dim) if only_o else None  # o_proj
    variants = {"torch-argmax": (0, True)} | {f"prefetch-{b}": (b, False) for b in budgets}
    accs = {name: build(model, b, t, max(PROMPTS) + NEW, only) for name, (b, t) in variants.items()}
    doc = {"environment": environment_report(), "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"),
           "model": model_name, "new_tokens": NEW, "only_o_proj": only_o, "runs": {},
           "variants": {n: {"prefetch_mib": b, "torch_argmax": t}
                        for n, (b, t) in variants.items()}}  # fmt: skip
    first_tokens = {}
    for r in range(-1, runs):  # round -1 warms up (the first prefill of each length compiles)
        for prompt_len in PROMPTS:
            prompt = [[(7 * i + 3) % vocab for i in range(prompt_len)]]
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
        base = statistics.median(doc["runs"][f"torch-argmax p{prompt_len}"]["tok_s"])
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
    main(sys.argv[1], options.get("model", "llama3-8b"),
         [int(b) for b in options.get("budgets", "0,8,16,32").split(",")],
         int(options.get("runs", 3)), "only=o" in sys.argv[2:])  # fmt: skip
