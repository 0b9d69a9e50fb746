"""How weight bytes get into arena tensors, shared by the whole-model upload (:mod:`.weights`)
and a tensor-parallel rank's (:mod:`.shard_upload`): synthetic tensors generated on the device,
checkpoint tensors streamed."""

from __future__ import annotations

import numpy as np

from ...kernels.ops import elementwise as ew
from ...models.synthetic import SyntheticWeights
from ...reference.synthetic import KIND_PARAMS

TAG = "weights"


def fill_synthetic_bf16(rt, source: SyntheticWeights, name: str, dst, stream) -> None:
    """Generate the whole bf16 tensor ``name`` of ``source`` into ``dst`` on the device."""
    spec = source.spec(name)
    center, scale = KIND_PARAMS[spec.kind]
    n = int(np.prod(spec.shape))
    ew.fill_uniform_bf16(rt, dst.reshape(n), n, source.seed, scale, center,
                         tensor_index=source.tensor_index(name)).launch(stream)


def load_checkpoint(rt, items, progress):
    """Stream ``items`` (:class:`~nexusrt.models.streaming.LoadItem`) into the arena with a bar."""
    from ...models.streaming import ProgressBar, load_tensors

    bar = progress if progress is not None else ProgressBar("loading weights")
    try:
        return load_tensors(rt, items, progress=bar)
    finally:
        if progress is None:
            bar.close()
