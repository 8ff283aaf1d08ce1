"""attnforge: verified attention-kernel acceleration for LLM inference.

`import attnforge` stays light: the optimizer loads on first use of its names, and transformers only when an
integration name (patch_transformers, optimized, ...) is first used; likewise the accelerator (`accelerate`,
`Accelerator`), its profiling helpers (`profile_model`, `benchmark_operation`, `device_info`) and weight
quantization (`quantize`, `load_quantized`). `af.mlx` is the mlx-lm integration
(attnforge.integrations.mlx_lm), imported on first access; without MLX that access raises ImportError with the
install command.
"""

from __future__ import annotations

import importlib

from attnforge.config import AttentionConfig, OptimizerSettings

__version__ = "0.1.0"

# Public name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "AttentionOptimizer": "attnforge.optimizer",
    "configure_optimizer": "attnforge.optimizer",
    "get_optimizer": "attnforge.optimizer",
    "scaled_dot_product_attention": "attnforge.optimizer",
    "patch_transformers": "attnforge.integrations.transformers",
    "unpatch_transformers": "attnforge.integrations.transformers",
    "optimized": "attnforge.integrations.transformers",
    "patch_model": "attnforge.integrations.transformers",
    "unpatch_model": "attnforge.integrations.transformers",
    "get_integration_status": "attnforge.integrations.transformers",
    "family_support": "attnforge.integrations.transformers",
    "load_and_patch_model": "attnforge.integrations.transformers",
    "benchmark_optimization": "attnforge.bench.optimization",
    "build_model": "attnforge.models",
    "load_model": "attnforge.models",
    "accelerate": "attnforge.accel",
    "Accelerator": "attnforge.accel",
    "profile_model": "attnforge.accel.profiling",
    "benchmark_operation": "attnforge.accel.profiling",
    "device_info": "attnforge.accel.profiling",
    "quantize": "attnforge.accel.quant",
    "load_quantized": "attnforge.accel.quant",
}

# Attribute -> integration module, imported on first access. Not in __all__: `from attnforge import *` must
# not import MLX.
_LAZY_MODULES = {"mlx": "attnforge.integrations.mlx_lm"}

__all__ = ["AttentionConfig", "OptimizerSettings", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'attnforge' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_MODULES))
