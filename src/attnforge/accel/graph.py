"""The decode step with static buffers, run eagerly or replayed from a CUDA graph.

A step reads `ids [b, 1]` (each sequence's last token) and `positions [b, 1]` (where that token goes in the
cache), runs the forward pass (optionally torch.compile'd), chooses the next token on the device, and leaves
everything ready for the next step: `token` holds the choice, `ids` takes it, `positions` advance by one. The
host only reads `token` (a copy to pinned memory, a step behind; see accelerator.py), so replays queue up
back to back. On a GPU the step is captured once per (batch size, sampling plan) and replayed per token: no
Python, no allocation, one launch per token. Without a CUDA device it runs eagerly (the same code).
"""

from __future__ import annotations

import torch

from attnforge.accel.forward import Walk
from attnforge.accel.sampling import SamplerState

WARMUP_STEPS = 3  # compiles (and autotunes) before capture: nothing may compile while a graph is captured
# Every step of every accelerator in a process compiles the same function (`_logits`), once per batch size,
# sampling plan and model: dynamo's default of 8 compiled versions per function would refuse the ninth.
RECOMPILE_LIMIT = 256


class DecodeStep:
    """One decode step for the first `batch` sequences of the cache, with static input/output buffers."""

    def __init__(
        self,
        walk: Walk,
        sampler: SamplerState,
        batch: int,
        plan: tuple[bool, bool],
        *,
        compile_options: dict | None,
    ) -> None:
        device = walk.cache.device
        self.walk, self.sampler, self.batch, self.plan = walk, sampler, batch, plan
        self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.token = torch.zeros(batch, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._forward = self._logits
        if compile_options is not None:
            self._forward = torch.compile(
                self._logits, fullgraph=True, dynamic=False, options=compile_options
            )

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
        return self.walk.logits(ids, positions, kv_lens, None, self.walk.cache.shape.max_seq_len)

    def logits(self) -> torch.Tensor:
        """Logits `[b, vocab]` (float32) of `ids` at `positions`, writing their keys (positions unchanged)."""
        # The lengths are an input of the compiled forward, not computed inside it: inductor recomputed them
        # before every layer's attention (one more kernel per layer). A rotating cache caps them at its size.
        kv_lens = self.walk.cache.valid_lengths(self.positions[:, 0] + 1)
        if self._forward is self._logits:
            return self._logits(self.ids, self.positions, kv_lens)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._forward(self.ids, self.positions, kv_lens)

    def step(self) -> None:
        """One eager step (what the graph replays)."""
        token = self.sampler.next_token(self.logits(), self.plan)
        self.token.copy_(token)
        self.ids.copy_(token[:, None])
        self.positions.add_(1)

    def load(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Start from `tokens [b]` (the last chosen ones), to be written at `positions [b]`."""
        self.ids.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))

    def run(self) -> None:
        """One step: a graph replay where captured, else eager."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def capture(self) -> None:
        """Warm up on a side stream (compiling, sizing the kernel workspace), then capture one step.

        The warm-up steps really run: they write garbage keys at the last cache positions (never valid
        data at the start of a generation, which rewrites what it reads) and the buffers are restored after.
        """
        max_seq_len = self.walk.cache.shape.max_seq_len
        self.walk.prepare_decode(self.batch)
        saved = [t.clone() for t in (self.ids, self.positions, self.sampler.seen)]
        self.positions.fill_(max(max_seq_len - WARMUP_STEPS - 1, 0))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        for tensor, value in zip((self.ids, self.positions, self.sampler.seen), saved, strict=True):
            tensor.copy_(value)
        torch.cuda.synchronize()
        self.graph = graph
