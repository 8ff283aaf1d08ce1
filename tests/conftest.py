"""Test setup: without a GPU, Triton kernels run through the interpreter (set before any kernel import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def graph_merge_entry(monkeypatch):
    """A decode tuning entry (32-key tiles, 4 splits) whose captured calls merge the splits by the last
    program, plain calls by a second kernel."""
    from attnforge.kernels import decode, decode_params

    base = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2}

    def launch_params(kernel, device, bucket, captured=False):
        return {**base, "combine": "last" if captured else "kernel"}

    monkeypatch.setattr(decode_params.tuning, "launch_params", launch_params)
    decode_params.bucket_params.cache_clear()
    decode._launch_for.cache_clear()
    yield
    monkeypatch.undo()
    decode_params.bucket_params.cache_clear()
    decode._launch_for.cache_clear()
