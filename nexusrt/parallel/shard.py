"""``shard(weights, plan, rank)``: a weight source that yields only one rank's part of each tensor.

A transform over an already mapped :class:`~nexusrt.models.weights.WeightSource` (gpt-fast's
idea: tensor parallelism is applied to a loaded model, the model code stays single-device).
The view's ``config`` is the plan's local config, so ``load`` and ``fused`` hand the
ordinary decoder a smaller model. From a checkpoint it reads only the rank's rows or columns
of each tensor through a memory map of the safetensors file (rows are one contiguous byte
range; a column slice reads ``1/N`` of each row, whole pages once rows are a few KiB);
other sources (synthetic weights) produce the whole tensor and slice it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ModelError
from ..models.safetensors import TensorInfo
from ..models.weights import CheckpointWeights, TensorSpec, WeightSource
from .plan import ShardPlan, Split


def read_split(info: TensorInfo, split: Split) -> np.ndarray:
    """Elements ``[split.start, split.stop)`` along ``split.axis`` of a safetensors tensor, via mmap."""
    want = info.np_dtype
    # ml_dtypes types (bf16) are mapped as unsigned ints of their width and viewed after the copy
    raw = want if want.kind in "biufc" else np.dtype(f"u{want.itemsize}")
    try:
        mapped = np.memmap(info.file, dtype=raw, mode="r", offset=info.offset, shape=info.shape)
    except (OSError, ValueError) as exc:  # ValueError: the file is shorter than the header says
        raise ModelError(f"{info.file}: cannot map tensor {info.name!r}: {exc}") from None
    index = [slice(None)] * len(info.shape)
    index[split.axis] = slice(split.start, split.stop)
    part = np.array(mapped[tuple(index)])  # the copy reads the pages; the map is dropped after
    del mapped
    return part.view(want) if raw != want else part


class ShardedWeights(WeightSource):
    """Rank ``rank``'s shard of ``base`` under ``plan`` (see :mod:`nexusrt.parallel.plan`)."""

    def __init__(self, base: WeightSource, plan: ShardPlan, rank: int):
        if base.config is not plan.config and base.config != plan.config:
            raise ValueError("the plan was made for another model's config")
        super().__init__(plan.local_config(rank))
        self.base, self.plan, self.rank = base, plan, rank
        # The local config is untied, so it lists an lm_head; give it the vocab slice's shape
        # and the HF tensor it really comes from (the embedding table when the model is tied).
        head = self._specs["lm_head"]
        split = plan.split("lm_head", rank)
        self._specs["lm_head"] = replace(head, hf_name=base.spec("lm_head").hf_name,
                                         shape=(split.stop - split.start, head.shape[1]))

    def _load(self, spec: TensorSpec) -> np.ndarray:
        split = self.plan.split(spec.name, self.rank)
        if split is None:
            return self.base._load(self.base.spec(spec.name))
        if isinstance(self.base, CheckpointWeights):
            part = read_split(self.base.ref(spec.name), split)
        else:
            whole = self.base._load(self.base.spec(spec.name))
            part = whole[(slice(None),) * split.axis + (slice(split.start, split.stop),)]
        if part.shape != spec.shape:  # a plan/spec disagreement would silently run a wrong model
            raise ModelError(f"shard of {spec.name!r} has shape {part.shape}, expected {spec.shape}")
        return part

    def close(self) -> None:
        """Nothing to release: the base source belongs to whoever mapped it."""


def shard(weights: WeightSource, plan: ShardPlan, rank: int) -> ShardedWeights:
    """The view of ``weights`` holding rank ``rank``'s part of every tensor under ``plan``."""
    return ShardedWeights(weights, plan, rank)
