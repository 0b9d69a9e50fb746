"""The NumPy model runner: the whole decoder in fp32 with a KV cache (the test oracle).

It loads weights in the fused layouts a GPU runner uses (``qkv``, ``gate_up``), so the
HF comparison tests check those layouts too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...reference.sampling import sample as sample_logits
from ...models.weights import WeightSource
from ..base import generate_tokens
from ...reference import ops

_INITIAL_CACHE = 256  # tokens; the cache doubles as needed up to max_context


@dataclass
class _Layer:
    attn_norm: np.ndarray
    qkv: np.ndarray  # [q_size + 2*kv_size, hidden]
    qkv_bias: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    o: np.ndarray
    mlp_norm: np.ndarray
    gate_up: np.ndarray  # [2*intermediate, hidden]
    down: np.ndarray


class CpuRunner:
    """A :class:`~nexusrt.backends.base.ModelRunner` in NumPy.

    ``max_context`` caps the cache below the model's ``max_position_embeddings``.
    """

    def __init__(self, weights: WeightSource, max_context: int | None = None):
        cfg = self.config = weights.config
        if max_context is not None and (not isinstance(max_context, int) or max_context <= 0):
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        self.max_context = min(cfg.max_position_embeddings, max_context or cfg.max_position_embeddings)
        self.embed = weights.load("embed")
        self.final_norm = weights.load("final_norm")
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights.load("lm_head")
        self.layers = [self._load_layer(weights, i) for i in range(cfg.num_hidden_layers)]
        self.inv_freq = ops.rope_inv_freq(cfg)
        self._k: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self._alloc_cache(min(_INITIAL_CACHE, self.max_context))
        self.position = 0
        self._logits: np.ndarray | None = None

    @staticmethod
    def _load_layer(w: WeightSource, i: int) -> _Layer:
        cfg, p = w.config, f"layers.{i}."
        return _Layer(
            attn_norm=w.load(p + "attn_norm"), qkv=w.fused(i, "qkv"),
            qkv_bias=w.fused(i, "qkv_bias") if cfg.attention_bias else None,
            q_norm=w.load(p + "q_norm") if cfg.qk_norm else None,
            k_norm=w.load(p + "k_norm") if cfg.qk_norm else None,
            o=w.load(p + "o"), mlp_norm=w.load(p + "mlp_norm"), gate_up=w.fused(i, "gate_up"),
            down=w.load(p + "down"))

    def _alloc_cache(self, capacity: int) -> None:
        cfg = self.config
        shape = (capacity, cfg.num_key_value_heads, cfg.head_dim)
        old_k, old_v = self._k, self._v
        self._k = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self._v = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        for new, old in zip(self._k + self._v, old_k + old_v):
            new[:old.shape[0]] = old

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
        self.layers, self._k, self._v = [], [], []
        self.embed = self.lm_head = self.final_norm = None
        self._logits = None

    # -- the decoder ----------------------------------------------------------------
    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        cfg = self.config
        t = ids.shape[0]
        if t == 0:
            raise ValueError("cannot run zero tokens")
        end = self.position + t
        if end > self.max_context:
            raise ValueError(f"{end} tokens exceed the context of {self.max_context}")
        if np.any(ids < 0) or np.any(ids >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {ids.min()}..{ids.max()}")
        if end > self._k[0].shape[0]:
            self._alloc_cache(min(self.max_context, max(end, 2 * self._k[0].shape[0])))
        positions = np.arange(self.position, end)
        x = ops.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            x = x + self._attention(layer, ops.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps), positions, li)
            h = ops.rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gu = ops.linear(h, layer.gate_up)
            x = x + ops.linear(ops.silu_mul(gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:]),
                               layer.down)
        self.position = end
        rows = x if all_logits else x[-1:]
        return ops.linear(ops.rms_norm(rows, self.final_norm, cfg.rms_norm_eps), self.lm_head)

    def _attention(self, layer: _Layer, h: np.ndarray, positions: np.ndarray, li: int) -> np.ndarray:
        cfg = self.config
        t, d = h.shape[0], cfg.head_dim
        qkv = ops.linear(h, layer.qkv, layer.qkv_bias)
        q = qkv[:, :cfg.q_size].reshape(t, cfg.num_attention_heads, d)
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(t, cfg.num_key_value_heads, d)
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(t, cfg.num_key_value_heads, d)
        if cfg.qk_norm:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q = ops.apply_rope(q, positions, self.inv_freq)
        k = ops.apply_rope(k, positions, self.inv_freq)
        start, end = positions[0], positions[-1] + 1
        self._k[li][start:end] = k
        self._v[li][start:end] = v
        out = ops.attention(q, self._k[li][:end], self._v[li][:end], positions, cfg.sliding_window)
        return ops.linear(out.reshape(t, cfg.q_size), layer.o)
