"""The NumPy model runner: one sequence through the paged decoder (the test oracle).

It runs :class:`~nexusrt.backends.cpu.decoder.PagedDecoder` on a private block pool that
holds ``max_context`` tokens, so the oracle computes every token exactly as the serving
engine's batched steps do (:mod:`nexusrt.backends.cpu.batch`): the same ids alone or batched.
The decoder loads weights in the fused layouts a GPU runner uses (``qkv``, ``gate_up``), so
the HF comparison tests check those layouts too.
"""

from __future__ import annotations

import numpy as np

from ...kvcache.blocks import BlockPool, SequenceBlocks, blocks_for
from ...models.weights import WeightSource
from ...reference.sampling import sample as sample_logits
from ..base import Rows, generate_tokens
from .decoder import PagedDecoder


class CpuRunner:
    """A :class:`~nexusrt.backends.base.ModelRunner` in NumPy.

    ``max_context`` caps the cache below the model's ``max_position_embeddings``. ``decoder``
    shares the weights of another runner (the engine's batch runner shares the oracle's).
    """

    def __init__(self, weights: WeightSource, max_context: int | None = None, decoder: PagedDecoder | None = None):
        cfg = self.config = weights.config
        if max_context is not None and (not isinstance(max_context, int) or max_context <= 0):
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        self.max_context = min(cfg.max_position_embeddings, max_context or cfg.max_position_embeddings)
        self.decoder = decoder or PagedDecoder(weights)
        n = blocks_for(self.max_context)
        self._pools = self.decoder.new_pools(n)  # zeroed: memory is committed as blocks are written
        self._blocks = SequenceBlocks(BlockPool(n), n)
        self.position = 0
        self._logits: np.ndarray | None = None

    # -- ModelRunner ----------------------------------------------------------------
    def reset(self) -> None:
        self.position = 0
        self._logits = None

    def prefill(self, token_ids) -> None:
        self._logits = self._forward(np.asarray(token_ids, dtype=np.int32).reshape(-1), all_logits=False)[-1]

    def decode(self, token_id: int) -> None:
        self._logits = self._forward(np.array([token_id], dtype=np.int32), all_logits=False)[-1]

    def last_logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits yet: call prefill() first")
        return self._logits.copy()

    def forward_all(self, token_ids) -> np.ndarray:
        self.reset()
        logits = self._forward(np.asarray(token_ids, dtype=np.int32).reshape(-1), all_logits=True)
        self._logits = logits[-1]
        return logits

    def sample(self, params, step: int) -> int:
        return sample_logits(self.last_logits(), params, step)

    def generate_tokens(self, prompt_ids, max_new_tokens: int, params, on_token) -> int:
        """The reference generation loop over this runner's own steps."""
        return generate_tokens(self, prompt_ids, max_new_tokens, params, on_token)

    def close(self) -> None:
        self.decoder.close()
        self._pools = ([], [])
        self._logits = None

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        if ids.shape[0] == 0:
            raise ValueError("cannot run zero tokens")
        end = self.position + ids.shape[0]
        if end > self.max_context:
            raise ValueError(f"{end} tokens exceed the context of {self.max_context}")
        self._blocks.ensure(end)  # the whole pool is this sequence's: blocks are never given back
        rows = np.arange(ids.shape[0]) if all_logits else [ids.shape[0] - 1]
        logits = self.decoder.forward_logits([Rows(ids, self.position, self._blocks.blocks)], self._pools, rows)
        self.position = end
        return logits
