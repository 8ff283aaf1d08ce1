"""What the optimizer did: calls counted per decision, the totals derived when asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnforge.optimizer.policy import Decision


@dataclass
class OptimizerStats:
    """Counts of attention calls, by outcome (calls replayed from a captured CUDA graph are not seen).

    Counted per decision (one dictionary update per call); the totals are derived when asked for.
    input_copies: calls whose inputs torch's fused SDPA could not take as they were (unaligned views), by
    reason; those inputs were copied first.
    """

    by_decision: dict[int, list] = field(default_factory=dict)  # id(decision) -> [decision, calls]
    input_copies: dict[str, int] = field(default_factory=dict)

    def record(self, decision: Decision) -> bool:
        """Count one call carried out as `decision` says; True the first time this decision is counted."""
        entry = self.by_decision.get(id(decision))
        if entry is None:
            self.by_decision[id(decision)] = [decision, 1]  # the entry keeps the decision (and its id) alive
            return True
        entry[1] += 1
        return False

    def record_copy(self, reason: str) -> None:
        self.input_copies[reason] = self.input_copies.get(reason, 0) + 1

    @property
    def calls(self) -> int:
        return sum(calls for _, calls in self.by_decision.values())

    @property
    def optimized(self) -> int:
        return sum(calls for decision, calls in self.by_decision.values() if decision.optimized)

    @property
    def by_kernel(self) -> dict[str, int]:
        return self._totals(lambda d: d.kernel if d.optimized else None)

    @property
    def fallbacks(self) -> dict[str, int]:
        return self._totals(lambda d: None if d.optimized else d.category)

    @property
    def optimization_rate(self) -> float:
        """Fraction of calls that ran an attnforge kernel (0.0 before any call)."""
        calls = self.calls
        return self.optimized / calls if calls else 0.0

    def _totals(self, label_of) -> dict[str, int]:
        totals: dict[str, int] = {}
        for decision, calls in self.by_decision.values():
            label = label_of(decision)
            if label is not None:
                totals[label] = totals.get(label, 0) + calls
        return totals

    def as_dict(self) -> dict:
        fallbacks = self.fallbacks
        return {
            "calls": self.calls,
            "optimized": self.optimized,
            "fallbacks": sum(fallbacks.values()),
            "by_kernel": self.by_kernel,
            "fallback_reasons": fallbacks,
            "input_copies": dict(self.input_copies),
            "optimization_rate": self.optimization_rate,
        }
