"""Which rows and columns of each weight a tensor-parallel rank holds (Megatron-style splits).

The model stays single-device: a rank runs the ordinary decoder on a *smaller model*, the
one :meth:`ShardPlan.local_config` describes (``Hq/N`` query heads, ``Hkv/N`` KV heads,
``I/N`` MLP width), and the partial outputs of its row-parallel linears are summed across
ranks (:mod:`nexusrt.parallel.comm`). The splits, in HF layout (``[out, in]``):

- ``q k v`` (and their biases): column-parallel, i.e. rows of the weight, by whole heads.
  Rank ``r`` holds query heads ``[r*Hq/N, (r+1)*Hq/N)`` and KV heads ``[r*Hkv/N, ...)``;
  the GQA group of a query head stays on its rank because ``Hq/N = (Hq/Hkv) * Hkv/N``. The
  fused ``qkv`` of the shard is the local q, then local k, then local v rows, which is the
  single-device fused layout of the local config, so the decoder needs no change.
- ``gate up``: column-parallel by the same rows of both, so a rank's fused ``gate_up`` is
  its gate slice followed by the *matching* up slice and SiLU(gate)·up stays rank-local.
- ``o down``: row-parallel, i.e. columns of the weight (the inputs the rank produced);
  each rank's product is a partial sum of the full output, all-reduced.
- ``lm_head``: vocab-parallel (rows); each rank's logits are a vocab slice, all-gathered.
- ``embed``: replicated. A lookup is a gather of one row per token with nothing to split,
  and a vocab-split table would cost an extra all-reduce of the hidden rows every step; the
  price is ``vocab x hidden`` per rank (1 GiB in bf16 at Llama-3 8B). With tied embeddings
  the LM head still reads only its rows of the same table.
- norms (``attn_norm mlp_norm final_norm``, Qwen3's per-``head_dim`` ``q_norm k_norm``):
  replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelError
from ..models.config import ModelConfig

# short name -> (axis of the HF tensor to split, which size is split): None = replicated
_SPLITS = {
    "q": (0, "q"), "q_bias": (0, "q"), "k": (0, "kv"), "k_bias": (0, "kv"), "v": (0, "kv"),
    "v_bias": (0, "kv"), "gate": (0, "inter"), "up": (0, "inter"), "o": (1, "q"),
    "down": (1, "inter"), "lm_head": (0, "vocab"),
}


@dataclass(frozen=True)
class Split:
    """Rank's part of one tensor: elements ``[start, stop)`` along ``axis``."""

    axis: int
    start: int
    stop: int


class ShardPlan:
    """The tensor-parallel split of ``config`` over ``size`` ranks.

    Raises :class:`~nexusrt.errors.ModelError` naming the field and ``size`` when a head
    count, the vocabulary or the MLP width does not divide evenly, and ``ValueError`` for a
    degree that is not an integer >= 1.
    """

    def __init__(self, config: ModelConfig, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel must be an integer >= 1, got {size!r}")
        for field in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"):
            value = getattr(config, field)
            if value % size:
                raise ModelError(f"{config.source}: {field} ({value}) is not divisible by tensor_parallel={size}; "
                                 f"every rank must hold the same whole number of them")
        self.config, self.size = config, size

    def local_config(self, rank: int) -> ModelConfig:
        """The single-device shape one rank runs: local head counts and MLP width, full vocab
        (the embedding is replicated) and untied embeddings (its LM head is its own slice)."""
        self._check_rank(rank)
        c, n = self.config, self.size
        return replace(c, num_attention_heads=c.num_attention_heads // n,
                       num_key_value_heads=c.num_key_value_heads // n, intermediate_size=c.intermediate_size // n,
                       tie_word_embeddings=False, source=f"{c.source} (rank {rank} of tensor_parallel={n})")

    def split(self, name: str, rank: int) -> Split | None:
        """The part of tensor ``name`` (our name, e.g. ``layers.3.o``) rank ``rank`` holds;
        ``None`` when every rank holds all of it."""
        self._check_rank(rank)
        rule = _SPLITS.get(name.rsplit(".", 1)[-1])
        if rule is None:
            return None
        c = self.config
        full = {"q": c.q_size, "kv": c.kv_size, "inter": c.intermediate_size, "vocab": c.vocab_size}[rule[1]]
        part = full // self.size  # whole heads: q_size/N = (Hq/N) * head_dim
        return Split(rule[0], rank * part, (rank + 1) * part)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank must be an integer in [0, {self.size}), got {rank!r}")
