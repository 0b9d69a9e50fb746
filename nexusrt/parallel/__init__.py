"""Tensor parallelism as a transform over loaded weights: the split (:class:`ShardPlan`), the
shard view (:func:`shard`) and the in-process communicator (:class:`LocalGroup`)."""

from .comm import LocalGroup
from .plan import ShardPlan, Split
from .shard import ShardedWeights, read_split, shard

__all__ = ["LocalGroup", "ShardPlan", "ShardedWeights", "Split", "read_split", "shard"]
