"""Test setup: without a GPU, Triton kernels run through the interpreter (set before any kernel import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _decode_entry(monkeypatch, plain: dict, captured: dict):
    """A decode tuning entry for every bucket: `plain` for eager calls, `captured` for calls in a CUDA graph
    (the launch caches cleared before and after)."""
    from attnforge.kernels import decode, decode_params

    def launch_params(kernel, device, bucket, is_captured=False):
        return captured if is_captured else plain

    monkeypatch.setattr(decode_params.tuning, "launch_params", launch_params)
    decode_params.bucket_params.cache_clear()
    decode._launch_for.cache_clear()
    yield
    monkeypatch.undo()
    decode_params.bucket_params.cache_clear()
    decode._launch_for.cache_clear()


@pytest.fixture
def graph_merge_entry(monkeypatch):
    """A decode tuning entry (32-key tiles, 4 splits) whose captured calls merge the splits by the last
    program, plain calls by a second kernel."""
    base = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2}
    yield from _decode_entry(monkeypatch, {**base, "combine": "kernel"}, {**base, "combine": "last"})


@pytest.fixture
def graph_launch_entry(monkeypatch):
    """A decode tuning entry whose captured calls launch otherwise (`graph_params`): 32-key tiles and 4
    splits in plain calls, 16-key tiles and 8 splits (a larger workspace) in captured ones."""
    plain = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2}
    yield from _decode_entry(monkeypatch, plain, {**plain, "BLOCK_N": 16, "num_splits": 8})
