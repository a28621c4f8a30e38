"""The operations work is scored for, and the seed's formula for each target.

Base scores, each in [0, 1] (latency is the heartbeat RTT moving average for an agent,
the request RTT for a model endpoint):

* code execution: 0.4 * free-memory fraction + 0.6 / (1 + latency_ms / 50)
* LLM inference: 1 / (1 + latency_ms / 10)
* context compression: 1 / (1 + latency_ms / 5)
* model loading: free-memory fraction

Both wings use these: the fleet to pick an agent, the model router to pick an endpoint.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Operation = Literal["code_execution", "llm_inference", "context_compression", "model_loading"]
OPERATIONS: tuple[Operation, ...] = (
    "code_execution", "llm_inference", "context_compression", "model_loading",
)

class Formula(NamedTuple):
    """memory_weight * free-memory fraction + latency_weight / (1 + latency_ms / scale_ms)."""

    memory_weight: float
    latency_weight: float
    scale_ms: float


# One shape for all four formulas lets the selection loop score without a call per row.
FORMULAS: dict[Operation, Formula] = {
    "code_execution": Formula(0.4, 0.6, 50.0),
    "llm_inference": Formula(0.0, 1.0, 10.0),
    "context_compression": Formula(0.0, 1.0, 5.0),
    "model_loading": Formula(1.0, 0.0, 1.0),
}


def formula(operation: Operation, *, latency_ms: float, memory_free_fraction: float) -> float:
    """The operation's formula for any target (agent or exo endpoint), in [0, 1]."""
    memory_weight, latency_weight, scale_ms = FORMULAS[operation]
    return memory_weight * memory_free_fraction + latency_weight / (1.0 + latency_ms / scale_ms)
