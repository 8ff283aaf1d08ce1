"""Issue 11 probe (scratch, kept with its results): the greedy step's `logits.argmax(-1)` over a batch-1 vocab
took 28 us a step for Llama-3-8B under the profiler (`h100/accel-profile/prof-accel-llama3-8b-p4096-
2c52130.json`), 0.5% of the step. Is a two-stage argmax (chunk maxima, then the first chunk holding the
maximum) faster, and equal? And `kernels.argmax.argmax_rows` (Triton, two launches), added after the first
run. Per call inside a CUDA graph of 28 calls on distinct buffers (cold-ish L2), fp32
logits [1, V]; writes JSON to the path given:

    PYTHONPATH=src python benchmarks/results/gpu/argmax/argmax_probe.py OUT.json
"""

import functools
import json
import sys

import torch

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels.argmax import argmax_rows


def two_stage(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    """argmax over the last dim of [b, V] (V % chunks == 0): the maximum and its first index per chunk, then
    the first chunk that holds the overall maximum."""
    b, v = logits.shape
    values, index = logits.view(b, chunks, v // chunks).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (best * (v // chunks) + index.gather(1, best)).squeeze(1)


def main(path: str) -> None:
    rows = []
    for vocab in (128256, 151936):
        buffers = [torch.randn(1, vocab, device="cuda") for _ in range(28)]
        for logits in buffers[:4]:  # equal on random and on tied maxima (the first index wins)
            assert torch.equal(two_stage(logits, 128), logits.argmax(-1))
        tied = torch.zeros(1, vocab, device="cuda")
        tied[0, [7, vocab - 3]] = 1.0
        equal_on_ties = bool(torch.equal(two_stage(tied, 128), tied.argmax(-1)))
        for logits in buffers[:4] + [tied]:
            assert torch.equal(argmax_rows(logits), logits.argmax(-1))
        variants = {"argmax": lambda x: x.argmax(-1), "two-stage-128": lambda x: two_stage(x, 128),
                    "two-stage-64": lambda x: two_stage(x, 64), "kernels.argmax": argmax_rows}  # fmt: skip
        for name, fn in variants.items():
            calls = [functools.partial(fn, logits) for logits in buffers]
            samples = timing.time_graph_per_call(calls.__getitem__, layers=28, reps=50)
            us = timing.summarize(samples)["median_us"]
            rows.append({"vocab": vocab, "variant": name, "graph_us": us, "equal_on_ties": equal_on_ties})
            print(f"V={vocab} {name}: {us:.2f} us")
    with open(path, "w") as file:
        json.dump({"environment": environment_report(), "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
