"""Test setup: without a GPU, Triton kernels run through the interpreter (set before any kernel import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
