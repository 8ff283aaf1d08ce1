"""The optimizer: a pure policy (policy.py: call -> decision with its reason, from the settings and the tuning
store), a runtime (runtime.py: cached decisions, kernel or torch SDPA, fallback) and its statistics
(stats.py)."""

from attnforge.optimizer.policy import KERNEL_ENTRY_POINTS, CallFeatures, Decision
from attnforge.optimizer.runtime import (
    AttentionOptimizer,
    configure_optimizer,
    get_optimizer,
    scaled_dot_product_attention,
    torch_fallback,
)
from attnforge.optimizer.stats import OptimizerStats

__all__ = [
    "KERNEL_ENTRY_POINTS",
    "AttentionOptimizer",
    "CallFeatures",
    "Decision",
    "OptimizerStats",
    "configure_optimizer",
    "get_optimizer",
    "scaled_dot_product_attention",
    "torch_fallback",
]
