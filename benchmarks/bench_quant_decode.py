"""Decode speed per quantization recipe with the accelerator (issue 15; step 3 of docs/quant.md's GPU plan).

    PYTHONPATH=src python3 benchmarks/bench_quant_decode.py --model llama3-8b --out benchmarks/results/h100

One process: for bf16 and each recipe, the bundled architecture with random weights (the same seed each
time; speed does not depend on weight values) is built, quantized (`af.quantize(..., backend=...)`) and
accelerated (CUDA graph + compile on a GPU); one warm-up generation, then `--runs` measured ones of
`--new-tokens` tokens after a `--prompt-tokens` prompt, batch 1, EOS ignored. Reported: median decode tok/s,
achieved GB/s (weights + K/V read per step / time), weight bytes per step, the ratio to bf16, and the read
bandwidth measured in the same run. Without a GPU it runs the same rows (a smoke test; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
from pathlib import Path

import torch

import attnforge as af
from attnforge import models
from attnforge.bench.report import markdown_table, run_environment, write_json

TARGETS = {"speed-4bit": 1.8, "quality-8bit": 1.4}  # issue 15: decode tok/s over bf16


def measure(name: str, recipe: str | None, args, device: torch.device) -> dict:
    """One row: build, quantize (unless bf16), accelerate, warm up, time `args.runs` generations."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = {k: v for k, v in {"num_hidden_layers": args.layers, "vocab_size": args.vocab}.items() if v}
    model = models.build_model(name, dtype=dtype, device=device, seed=0, **overrides)
    report = None
    if recipe is not None:
        report = af.quantize(model, recipe, args.group_size, backend=args.backend)
    acc = af.accelerate(model, max_seq_len=args.prompt_tokens + args.new_tokens + 8)
    prompt = [(7 * i) % model.config.vocab_size for i in range(args.prompt_tokens)]
    speeds, bandwidths = [], []
    for run in range(args.warmup + args.runs):
        metrics = acc.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True).metrics
        if run >= args.warmup:
            speeds.append(metrics.decode_tok_s)
            bandwidths.append(metrics.bandwidth_gb_s)
    row = {
        "recipe": recipe or str(dtype).removeprefix("torch."),
        "group_size": args.group_size if recipe else None,
        "backend": args.backend if recipe else None,
        "decode_tok_s": statistics.median(speeds),
        "samples_tok_s": speeds,
        "bandwidth_gb_s": statistics.median(bandwidths),
        "weight_bytes": acc.weight_bytes,
        "graph": acc.info["graph"],
        "compile": acc.info["compile"],
        "layers": report.summary() if report else None,
    }
    del acc, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(doc: dict) -> str:
    header = ["recipe", "group", "backend", "tok/s", "x unquantized", "GB/s", "weights GB/step", "target"]
    rows = [
        [
            r["recipe"],
            r["group_size"] or "-",
            r["backend"] or "-",
            f"{r['decode_tok_s']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['bandwidth_gb_s']:.0f}",
            f"{r['weight_bytes'] / 1e9:.2f}",
            TARGETS.get(r["recipe"], ""),
        ]
        for r in doc["rows"]
    ]
    env = doc["environment"]
    lines = [
        f"# Decode per quantization recipe: {doc['model']} (random weights), batch 1",
        "",
        f"- Device: {env.get('gpu') or 'CPU only (smoke test: numbers mean nothing)'}; "
        f"torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}; commit {env.get('git_commit')}",
        f"- Prompt {doc['prompt_tokens']}, {doc['new_tokens']} new tokens, median of {doc['runs']} runs; "
        f"read bandwidth measured in this run: {doc.get('read_gbps') or '-'} GB/s",
        "",
        markdown_table(header, rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--recipes", default="quality-8bit,balanced-5bit,speed-4bit,mixed")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="keep N layers (smoke tests)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (smoke tests)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = {
        "what": "quant-decode",
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "environment": run_environment(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }
    if device.type == "cuda":
        from attnforge.bench.timing import measure_read_bandwidth

        doc["read_gbps"] = round(measure_read_bandwidth() / 1e9)
    stem = f"quant-decode-{args.model}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    for recipe in [None, *[r for r in args.recipes.split(",") if r]]:
        doc["rows"].append(measure(args.model, recipe, args, device))
        base = doc["rows"][0]["decode_tok_s"]
        for row in doc["rows"]:
            row["ratio"] = row["decode_tok_s"] / base
        write_json(doc, args.out / f"{stem}.json")  # after every row
        (args.out / f"{stem}.md").write_text(markdown(doc))
        print(doc["rows"][-1]["recipe"], f"{doc['rows'][-1]['decode_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
