"""One tensor-parallel rank's shard into the arena, in :mod:`.weights`' layout: only its part is read.

``fill_shard`` takes the (name, destination) list of :func:`.weights.upload`'s layout over a
:class:`~nexusrt.parallel.ShardedWeights` view (the rank's local shapes) and fills it:

- **from a checkpoint**, replicated tensors and row splits (q k v and their biases, gate up,
  the LM head's vocab rows) are one contiguous byte range of their safetensors file: the
  tensor's entry narrowed to those rows is streamed like any whole tensor (cuFile or pinned
  staging, fp32 converted on the device). Column splits (O and down: each row's slice) are
  not contiguous: they come through the memory map (:func:`~nexusrt.parallel.read_split`,
  about ``1/N`` of the pages) and are converted on the host. A tied model's LM head is not in
  the layout's list: it is a view of its rows of the replicated embedding (:mod:`.weights`).
- **synthetic weights** are generated on the device (the bit-exact fill kernel needs the
  whole tensor's element indices), whole, into one scratch tensor; the rank's rows are one
  device copy, its columns one 2D copy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ... import memory
from ...driver.calls import call
from ...memory.copy import copy_2d
from ...models.synthetic import SyntheticWeights
from ...models.weights import CheckpointWeights
from .fill import TAG, fill_synthetic_bf16, load_checkpoint


def narrowed(info, start: int, stop: int):
    """The safetensors entry ``info`` cut to rows ``[start, stop)``: one contiguous byte range."""
    row_bytes = info.nbytes // info.shape[0]
    return replace(info, name=f"{info.name}[{start}:{stop}]", shape=(stop - start,) + tuple(info.shape[1:]),
                   offset=info.offset + start * row_bytes, nbytes=(stop - start) * row_bytes)


def fill_shard(rt, source, assign, stream, progress=None):
    """Fill every ``(name, dst)`` of ``assign`` with ``source``'s (a ShardedWeights) part of it.
    Returns the checkpoint stream's load report (None for synthetic weights)."""
    base = source.base
    if isinstance(base, SyntheticWeights):
        _fill_synthetic_shard(rt, source, assign, stream)
        return None
    if not isinstance(base, CheckpointWeights):
        raise TypeError(f"a CUDA rank loads its shard from a checkpoint or synthetic weights, not {type(base).__name__}")
    from ...models.streaming import LoadItem

    items = []
    for name, dst in assign:
        split = source.plan.split(name, source.rank)
        info = base.ref(name)
        if split is None:
            items.append(LoadItem(info, dst, convert=dst.dtype))
        elif split.axis == 0:
            items.append(LoadItem(narrowed(info, split.start, split.stop), dst, convert=dst.dtype))
        else:  # its rows' column slices, through the map; bf16 stays bf16, fp32 is converted here
            dst.copy_from(np.ascontiguousarray(source.load(name, dtype=None)), convert=True)
    return load_checkpoint(rt, items, progress)


def _fill_synthetic_shard(rt, source, assign, stream) -> None:
    base = source.base
    splits = {name: source.plan.split(name, source.rank) for name, _ in assign}
    wanted = [base.spec(n).shape for n, dst in assign if splits[n] is not None and dst.dtype == "bf16"]
    scratch = memory.empty((max(int(np.prod(s)) for s in wanted),), "bf16", tag=TAG) if wanted else None
    try:
        for name, dst in assign:
            split = splits[name]
            if dst.dtype == "fp32":  # norms and biases: tiny, generated and sliced on the host
                dst.copy_from(np.ascontiguousarray(source.load(name, np.float32)))
            elif split is None:
                fill_synthetic_bf16(rt, base, name, dst, stream)
            else:
                shape = base.spec(name).shape
                whole = scratch[0:int(np.prod(shape))].reshape(shape)
                fill_synthetic_bf16(rt, base, name, whole, stream)
                copy_split(dst, whole, split, stream)
        stream.synchronize()  # the scratch is reused in stream order and freed only after the last copy
    finally:
        if scratch is not None:
            scratch.free()


def copy_split(dst, whole, split, stream) -> None:
    """Rows ``[start, stop)`` (axis 0) or columns (axis 1) of the 2-D device tensor ``whole``
    into ``dst``, in stream order."""
    rows, cols = whole.shape
    item = whole.itemsize
    if split.axis == 0:
        call("cuMemcpyDtoDAsync", dst.ptr, whole.ptr + split.start * cols * item, dst.nbytes, stream.handle)
        return
    copy_2d(dst.ptr, dst.shape[1] * item, whole.ptr + split.start * item, cols * item, dst.shape[1] * item, rows,
            stream.handle)
