"""The accelerator: a transformers causal LM as a fast generator (static KV cache, attnforge kernels, a
CUDA-graph decode step, sampling on the device), plus the profiling helpers MLX users expect.

    acc = attnforge.accelerate(model, tokenizer, max_seq_len=2048)
    print(acc.generate("What is the capital of France?", chat=True).text)

Layering (DESIGN.md): accel imports kernels, optimizer, integrations and models; nothing below imports it.
"""

from attnforge.accel.accelerator import Accelerator, Generation, StreamEvent, accelerate
from attnforge.accel.cache import CacheTooLargeError
from attnforge.accel.layout import UnsupportedModelError
from attnforge.accel.metrics import GenerationMetrics
from attnforge.accel.sampling import SamplingParams

__all__ = [
    "Accelerator",
    "CacheTooLargeError",
    "Generation",
    "GenerationMetrics",
    "SamplingParams",
    "StreamEvent",
    "UnsupportedModelError",
    "accelerate",
]
