"""Tensor parallelism as a transform over loaded weights: the split (:class:`ShardPlan`), the
shard view (:func:`shard`), the communicators (:class:`LocalGroup` in process,
:class:`ShmGroup` between processes) and the worker processes (:class:`WorkerGroup`)."""

from .comm import LocalGroup
from .plan import ShardPlan, Split
from .procs import WorkerDied, WorkerGroup
from .shard import ShardedWeights, read_split, shard
from .shm import CollectiveTimeout, ShmGroup

__all__ = ["CollectiveTimeout", "LocalGroup", "ShardPlan", "ShardedWeights", "ShmGroup", "Split", "WorkerDied",
           "WorkerGroup", "read_split", "shard"]
