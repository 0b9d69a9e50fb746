"""The NumPy decoder over paged KV: any number of sequences' rows in one pass, batch invariant.

Both CPU runners run this: :class:`~nexusrt.backends.cpu.model.CpuRunner` (one sequence,
the oracle) and :class:`~nexusrt.backends.cpu.batch.CpuBatchRunner` (the serving engine's
steps). The KV cache of a layer is a block pool ``[num_blocks, Hkv, BLOCK_SIZE, D]``
(:mod:`nexusrt.kvcache.blocks`) addressed through each sequence's block table, so sequences
that share a cached prefix read the same blocks.

**Batch invariance.** A token's KV and logits depend only on the tokens before it, never on
which other rows share the pass or how a prompt is cut into chunks:

- BLAS picks its kernel and blocking by the row count (GEMV at one row, GEMM tiles above),
  so a row of ``x @ w.T`` changes in the last bits with the rows beside it. Every linear
  here runs in tiles of exactly :data:`TILE_ROWS` rows (the last tile zero-padded): at a
  fixed row count a row's result depends only on the row (``tests/test_cpu_batch.py``).
- Attention runs one query row at a time over exactly the keys it sees, so no reduction's
  length or order depends on the chunk.
Norms, RoPE and SiLU are row-wise already. The cost: a lone decode row does a 16-row GEMM.

**Pruned caches.** A row's cache slot (``Rows.start``) and its RoPE position
(``Rows.position``) are the same until KV pruning evicts tokens (:mod:`nexusrt.serving.pruning`);
then the slots are compacted and the position runs on. ``Rows.scores``, when given, receives
each slot's attention mass (summed over rows, heads and layers) from the softmax computed
here, for the ``h2o`` policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...kvcache.blocks import BLOCK_SIZE, compact_tokens, gather_tokens, pool_shape, scatter_tokens
from ...models.weights import WeightSource
from ...reference import ops
from ..base import Rows

F32 = np.float32
TILE_ROWS = 16  # rows of every BLAS call; any fixed count works, 16 keeps a lone decode cheap


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


# Below this many multiply-adds per tile, every row is its own one-row call instead. OpenBLAS's
# small-matrix sgemm kernels (AVX-512 builds, taken up to about 100**3 multiply-adds) compute a
# row differently by its place in the tile: seen on an AMD EPYC with numpy 2.4.6, where row 7 of
# a 16 x 96 x 300 product differed in the last bit from the same row computed first in its
# tile. Model-sized products (hidden >= 1024) take the blocked kernels, which do not.
SMALL_TILE_MACS = 100 ** 3


def tiled_linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T (+ bias)`` with every BLAS call at exactly :data:`TILE_ROWS` rows (one row for
    products smaller than :data:`SMALL_TILE_MACS`), so a row's result does not depend on the
    rows computed beside it: the batched and the one-sequence runners agree bit for bit."""
    n = x.shape[0]
    wt = w.T
    rows = 1 if TILE_ROWS * w.shape[0] * w.shape[1] <= SMALL_TILE_MACS else TILE_ROWS
    pad = -n % rows
    if pad:
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), F32)])
    y = np.concatenate([x[i:i + rows] @ wt for i in range(0, x.shape[0], rows)])[:n]
    return y if bias is None else y + bias


def attend_row(q: np.ndarray, k: np.ndarray, v: np.ndarray, mass: np.ndarray | None = None) -> np.ndarray:
    """One query row ``q [Hq, D]`` over exactly the keys it sees ``k, v [S, Hkv, D]`` (GQA); with
    ``mass [S]``, adds each key's softmax weight summed over the heads to it (H2O's scores,
    from the probabilities this very computation forms)."""
    hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(hkv, hq // hkv, d)
    s = np.einsum("kgd,skd->kgs", qg, k, dtype=F32) * F32(1.0 / math.sqrt(d))
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    if mass is not None:
        mass += p.sum(axis=(0, 1), dtype=np.float64)
    return np.einsum("kgs,skd->kgd", p, v, dtype=F32).reshape(hq * d)


class DecoderSteps:
    """What both CPU runners call on a decoder, over its ``forward`` and ``logits``: one step
    that returns only the logits the runner wants, and KV compaction over its pools. A decoder
    whose hidden rows and pools live elsewhere (the tensor-parallel worker processes,
    :mod:`nexusrt.backends.cpu.tp_front`) implements these two instead, one message each."""

    @property
    def prune_policies(self) -> frozenset:
        """The KV pruning policies besides ``"full"`` a batch runner over this decoder runs:
        compaction, and h2o's attention mass, which the decoder adds into ``Rows.scores`` (in
        process, every rank's heads summed in one order)."""
        return frozenset({"sink-window", "h2o"})

    def forward_logits(self, batch: list[Rows], pools, rows) -> np.ndarray:
        """``forward`` the batch, then fp32 ``[len(rows), vocab]`` logits of hidden rows ``rows``
        (indices into the batch's rows; none: an empty array and no LM head work)."""
        # inf or NaN weights make every matmul and norm after them warn, dozens of lines a step;
        # the sampler reports the step once, clearly (NonFiniteLogits), so the warnings are off.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            hidden = self.forward(batch, pools)
            rows = np.asarray(rows, np.intp)
            if rows.size == 0:
                return np.zeros((0, self.config.vocab_size), F32)
            return self.logits(hidden[rows])

    def compact_pools(self, pools, table: list[int], keep) -> None:
        """Move cache slots ``keep`` (checked by the caller) to the front of ``table`` in every pool."""
        for per_layer in pools:
            for pool in per_layer:
                compact_tokens(pool, table, keep)


class PagedDecoder(DecoderSteps):
    """The decoder's weights (fused ``qkv`` / ``gate_up`` as a GPU runner lays them out) and
    its pass over :class:`Rows` of many sequences against paged K/V pools."""

    def __init__(self, weights: WeightSource, embed: np.ndarray | None = None,
                 lm_head: np.ndarray | None = None):
        """``embed``, ``lm_head``: tables already in memory, loaded from ``weights`` otherwise
        (tensor-parallel ranks share one replicated embedding table, and with tied embeddings a
        rank's LM head is a view of its vocab rows of that table, not a second read)."""
        cfg = self.config = weights.config
        self.embed = weights.load("embed") if embed is None else embed
        self.final_norm = weights.load("final_norm")
        if lm_head is None:
            lm_head = self.embed if cfg.tie_word_embeddings else weights.load("lm_head")
        self.lm_head = lm_head
        self.layers = [self._load_layer(weights, i) for i in range(cfg.num_hidden_layers)]
        self.inv_freq = ops.rope_inv_freq(cfg)

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

    def new_pools(self, num_blocks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Zeroed K and V pools, one per layer (np.zeros: the OS commits memory as blocks are written)."""
        cfg = self.config
        shape = pool_shape(num_blocks, cfg.num_key_value_heads, cfg.head_dim)
        return ([np.zeros(shape, F32) for _ in self.layers], [np.zeros(shape, F32) for _ in self.layers])

    def close(self) -> None:
        self.layers, self.embed, self.lm_head, self.final_norm = [], None, None, None

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """fp32 ``[R, vocab]`` logits of final hidden rows ``[R, hidden]`` (final norm, LM head)."""
        return tiled_linear(ops.rms_norm(hidden, self.final_norm, self.config.rms_norm_eps), self.lm_head)

    def forward(self, batch: list[Rows], pools) -> np.ndarray:
        """Append every :class:`Rows` to its sequence's cache; the final hidden rows ``[N, hidden]``
        (the batch's rows in order). Checks ids and table room before touching a pool."""
        x, positions = self.embed_rows(batch)
        for li in range(len(self.layers)):
            x = x + self.attention_out(li, x, positions, batch, pools)
            x = x + self.mlp_out(li, x)
        return x

    # The three pieces of forward, public so a tensor-parallel decoder (backends/cpu/sharded.py)
    # can sum the ranks' outputs of attention_out and mlp_out before each residual add.
    def embed_rows(self, batch: list[Rows]) -> tuple[np.ndarray, np.ndarray]:
        """The checked batch's embedding rows ``[N, hidden]`` and their RoPE positions ``[N]``."""
        cfg = self.config
        for r in batch:
            n = len(r.token_ids)
            if n == 0:
                raise ValueError("cannot run zero tokens")
            if r.start < 0 or r.start + n > len(r.table) * BLOCK_SIZE:
                raise ValueError(f"positions {r.start}..{r.start + n - 1} lie outside the "
                                 f"{len(r.table)} blocks of the table")
            if r.position is not None and r.position != r.start and cfg.sliding_window is not None:
                raise ValueError("KV pruning is not supported with a sliding-window model (its window is in positions)")
            if r.scores is not None and len(r.scores) < r.start + n:
                raise ValueError(f"scores hold {len(r.scores)} slots; the rows fill {r.start + n}")
            ids = np.asarray(r.token_ids)
            if np.any(ids < 0) or np.any(ids >= cfg.vocab_size):
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {ids.min()}..{ids.max()}")
        ids = np.concatenate([np.asarray(r.token_ids, np.int32) for r in batch])
        positions = np.concatenate([np.arange(r.first_position, r.first_position + len(r.token_ids))
                                    for r in batch])
        return ops.embedding(ids, self.embed), positions

    def attention_out(self, li: int, x: np.ndarray, positions, batch: list[Rows], pools) -> np.ndarray:
        """Layer ``li``'s attention block output (after O, before the residual add); appends K/V."""
        layer, (k_pools, v_pools) = self.layers[li], pools
        h = ops.rms_norm(x, layer.attn_norm, self.config.rms_norm_eps)
        return tiled_linear(self._attention(layer, h, positions, batch, k_pools[li], v_pools[li]), layer.o)

    def mlp_out(self, li: int, x: np.ndarray) -> np.ndarray:
        """Layer ``li``'s MLP block output (after down, before the residual add)."""
        layer, inter = self.layers[li], self.config.intermediate_size
        gu = tiled_linear(ops.rms_norm(x, layer.mlp_norm, self.config.rms_norm_eps), layer.gate_up)
        return tiled_linear(ops.silu_mul(gu[:, :inter], gu[:, inter:]), layer.down)

    def _attention(self, layer: _Layer, h, positions, batch: list[Rows], k_pool, v_pool) -> np.ndarray:
        cfg = self.config
        n, d = h.shape[0], cfg.head_dim
        qkv = tiled_linear(h, layer.qkv, layer.qkv_bias)
        q = qkv[:, :cfg.q_size].reshape(n, cfg.num_attention_heads, d)
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(n, cfg.num_key_value_heads, d)
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(n, cfg.num_key_value_heads, d)
        if cfg.qk_norm:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q = ops.apply_rope(q, positions, self.inv_freq)
        k = ops.apply_rope(k, positions, self.inv_freq)
        out = np.empty((n, cfg.q_size), F32)
        window = cfg.sliding_window
        row = 0
        for r in batch:
            t = len(r.token_ids)
            scatter_tokens(k_pool, r.table, r.start, k[row:row + t])
            scatter_tokens(v_pool, r.table, r.start, v[row:row + t])
            keys = gather_tokens(k_pool, r.table, r.start + t)
            values = gather_tokens(v_pool, r.table, r.start + t)
            for i in range(t):
                p = r.start + i
                lo = 0 if window is None else max(0, p - window + 1)
                mass = None if r.scores is None else r.scores[lo:p + 1]
                out[row + i] = attend_row(q[row + i], keys[lo:p + 1], values[lo:p + 1], mass)
            row += t
        return out
