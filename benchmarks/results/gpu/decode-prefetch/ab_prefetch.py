"""Issues 10 and 11 (scratch, kept with its results): what the L2 prefetch before the PDL wait
(`prefetch_tiles`) and the fused new-token kernel (`decode_step_attention`) buy, A/B in one process.

A. decode_attention per call in a CUDA graph of 28 calls on distinct buffers (tune's graph mode), 16:8 and
   32:8 d128 bf16 at 1k / 4k / 16k keys and 4k valid in a 4360-key static cache, the tuning entry's tiles and
   splits merged by the last program, prefetch_tiles 0 / 1 / 2 interleaved round by round; each variant's
   output is checked against the float64 oracle first.
B. The accelerator, Qwen3-0.6B random weights, batch 1, prompts 128 and 4096, 256 new tokens: the new token
   fused or not (`fuse_new_token`) x prefetch 0 / 1, interleaved round by round, decode tok/s medians.

    python benchmarks/results/gpu/decode-prefetch/ab_prefetch.py OUT_DIR [A|B|AB]

It ran at commit c61d822 (h100/decode-prefetch/); the prefetch lost and was removed from the kernels
after it, so this script runs against that commit only.

Writes OUT_DIR/ab-prefetch.json after every row and prints a table at the end.
"""

import json
import statistics
import sys
import time

import torch

from attnforge import environment, verify
from attnforge.bench import timing
from attnforge.config import AttentionConfig
from attnforge.kernels import decode, decode_params

LAYERS, ROUNDS = 28, 3
SHAPES = [(16, 8, 1024, None), (16, 8, 4096, None), (16, 8, 16384, None), (32, 8, 4096, None),
          (16, 8, 4360, 4096), (32, 8, 16384, None)]  # (Hq, Hkv, Lkv, valid) # fmt: skip


def _save(out_dir, results):
    with open(f"{out_dir}/ab-prefetch.json", "w") as file:
        json.dump(results, file, indent=1)


def _clear():
    decode_params.bucket_params.cache_clear()
    decode._launch_for.cache_clear()
    decode.merged_in_kernel.cache_clear()


def part_a(results, out_dir):
    for hq, hkv, lkv, valid in SHAPES:
        cfg = AttentionConfig.from_sizes(1, hq, hkv, 1, lkv, 128, dtype=torch.bfloat16, causal=True)
        lens = None if valid is None else torch.tensor([valid], device="cuda", dtype=torch.int32)
        case = verify.random_case(cfg, device="cuda", kv_lens=lens)
        bound = decode_params.kv_bound(lkv)
        base = decode_params.bucket_params((1, hq, 1, 128), hkv, bound, lens is not None, torch.bfloat16,
                                           torch.device("cuda"))  # fmt: skip
        tunable = {k: base[k] for k in ("BLOCK_M", "BLOCK_N", "num_splits", "num_warps", "num_stages")}
        buffers = [(torch.randn_like(case.q), torch.randn_like(case.k), torch.randn_like(case.v))
                   for _ in range(LAYERS)]  # fmt: skip
        row = {"shape": f"{hq}:{hkv} Lkv {lkv}" + (f" valid {valid}" if valid else ""), "params": tunable}
        variants = {f"prefetch{n}": dict(tunable, combine="last", prefetch_tiles=n) for n in (0, 1, 2)}
        for name, params in variants.items():  # correctness first
            out = torch.full_like(case.q, float("nan"))
            decode.launch_decode(case.q, case.k, case.v, out, scale=128**-0.5, kv_lens=lens, params=params)
            want = verify.reference_attention(case.q, case.k, case.v, causal=True, kv_lens=lens)
            row[f"{name}_rel_l2"] = float(verify.relative_l2_per_slice(out, want).max())
        samples = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, params in variants.items():

                def make(i, params=params, buffers=buffers, lens=lens):
                    q, k, v = buffers[i]
                    out = torch.empty_like(q)
                    return lambda: decode.launch_decode(q, k, v, out, scale=128**-0.5, kv_lens=lens,
                                                        params=params)  # fmt: skip

                samples[name] += timing.time_graph_per_call(make, layers=LAYERS, reps=20)
        for name, values in samples.items():
            row[f"{name}_us"] = statistics.median(values)
        results["a"].append(row)
        _save(out_dir, results)
        print(row, flush=True)


def part_b(results, out_dir):
    from attnforge import models
    from attnforge.accel import accelerate

    model = models.load_model("qwen3-0.6b", dtype=torch.bfloat16, attn_implementation="sdpa")
    for prompt_len in (128, 4096):
        prompt = [[(7 * i + 3) % model.config.vocab_size for i in range(prompt_len)]]
        variants = {}
        for fuse in (True, False):
            for prefetch in (0, 1):
                decode_params.PREFETCH_TILES = prefetch
                _clear()
                acc = accelerate(model, max_batch_size=1, max_seq_len=prompt_len + 256 + 8)
                acc.walk.attention.fuse_new_token = fuse
                acc.generate(prompt, max_new_tokens=256, ignore_eos=True)  # compile, capture
                variants[f"fuse{int(fuse)}-prefetch{prefetch}"] = acc
        rates = {name: [] for name in variants}
        tokens = {}
        for _ in range(ROUNDS + 1):
            for name, acc in variants.items():
                result = acc.generate(prompt, max_new_tokens=256, ignore_eos=True)
                rates[name].append(result.metrics.decode_tok_s)
                tokens[name] = result.tokens[0]
        first = next(iter(tokens.values()))
        row = {"prompt": prompt_len, **{f"{n}_tok_s": statistics.median(r) for n, r in rates.items()},
               "tokens_equal": {n: t == first for n, t in tokens.items()}}  # fmt: skip
        results["b"].append(row)
        _save(out_dir, results)
        print(row, flush=True)
    decode_params.PREFETCH_TILES = 0


def main(out_dir, parts="AB"):
    results = {"environment": environment.environment_report(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "a": [], "b": []}  # fmt: skip
    if "A" in parts:
        part_a(results, out_dir)
    if "B" in parts:
        part_b(results, out_dir)
    for row in results["a"]:
        cells = " ".join(f"p{n} {row[f'prefetch{n}_us']:.1f}" for n in (0, 1, 2))
        print(f"A {row['shape']:28s} {cells} us")
    for row in results["b"]:
        cells = " ".join(f"{k[:-6]} {v:.0f}" for k, v in row.items() if k.endswith("_tok_s"))
        print(f"B prompt {row['prompt']}: {cells} tok/s; tokens equal {row['tokens_equal']}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "AB")
