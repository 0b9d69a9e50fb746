"""How many bytes a model takes once loaded: its weights and its KV cache at full context.

Pure arithmetic on the config, so the engine can refuse a model that does not fit before
reading a byte of it (a consistent but huge checkpoint used to be read until the machine
ran out of memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Footprint:
    """Bytes of the weights, of the KV cache at ``context`` tokens and of the runner's working
    buffers (activations of its largest prefill chunk, workspaces)."""

    weights: int
    kv: int
    context: int
    working: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.working


def model_footprint(config: ModelConfig, weight_bytes: int, kv_bytes: int, context: int) -> Footprint:
    """Footprint with ``weight_bytes`` per parameter and ``kv_bytes`` per cached K or V element."""
    kv = 2 * config.num_hidden_layers * context * config.kv_size * kv_bytes
    return Footprint(config.num_parameters() * weight_bytes, kv, context)


def gib(n: int) -> str:
    """``n`` bytes as GiB for messages."""
    return f"{n / 2**30:.2f} GiB"
