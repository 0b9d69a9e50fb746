"""Put a model's weights into the arena in the layout the kernels want.

Linear weights are bf16 ``[out, in]``; q/k/v are fused into one ``qkv`` matrix and gate/up
into one ``gate_up`` matrix (row order as :mod:`nexusrt.models.weights` documents), so a
decode step runs one GEMV per group. Norm weights and biases are small and kept fp32.

The layout is decided first (every destination tensor allocated, each source tensor
assigned to a destination or a row range of a fused one); then the bytes arrive:

- from a checkpoint, in one streaming load (:func:`nexusrt.models.streaming.load_tensors`:
  cuFile or double-buffered pinned staging, reads in file order, fp32 converted to bf16
  on the GPU);
- for synthetic weights, generated on the device by ``fill_uniform_bf16``, bit-identical to
  the CPU formula, so a 16 GB model appears in seconds without crossing PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ... import memory
from ...models.synthetic import SyntheticWeights
from ...models.weights import FUSED
from ...parallel.shard import ShardedWeights
from .fill import TAG, fill_synthetic_bf16, load_checkpoint
from .shard_upload import fill_shard


@dataclass
class LayerWeights:
    attn_norm: object
    qkv: object
    qkv_bias: object | None
    q_norm: object | None
    k_norm: object | None
    o: object
    mlp_norm: object
    gate_up: object
    down: object


@dataclass
class DeviceWeights:
    embed: object
    final_norm: object
    lm_head: object  # the embedding table itself when tied
    layers: list[LayerWeights] = field(default_factory=list)
    owned: list = field(default_factory=list)  # every tensor allocated here, freed by free()
    inv_freq: object = None
    load_report: object = None  # how a checkpoint's bytes arrived (path, GB/s)

    def free(self) -> None:
        for t in self.owned:
            if t.is_live:
                t.free()
        self.owned.clear()


class _Layout:
    """Allocates destinations and records which source tensor fills which (sub)tensor."""

    def __init__(self, source):
        self.source = source
        self.owned: list = []
        self.assign: list[tuple[str, object]] = []  # (our tensor name, destination tensor)

    def _alloc(self, shape, dtype):
        t = memory.empty(shape, dtype, tag=TAG)
        self.owned.append(t)
        return t

    def one(self, name: str, dtype: str):
        t = self._alloc(self.source.spec(name).shape, dtype)
        self.assign.append((name, t))
        return t

    def fused(self, layer: int, group: str, dtype: str):
        parts = [f"layers.{layer}.{p}" for p in FUSED[group]]
        shapes = [self.source.spec(p).shape for p in parts]
        t = self._alloc((sum(s[0] for s in shapes),) + tuple(shapes[0][1:]), dtype)
        r0 = 0
        for p, s in zip(parts, shapes):
            self.assign.append((p, t[r0:r0 + s[0]]))
            r0 += s[0]
        return t


def _layout(source) -> tuple[DeviceWeights, _Layout]:
    cfg = source.config
    lay = _Layout(source)
    names = {s.name for s in source.specs()}
    embed = lay.one("embed", "bf16")
    if cfg.tie_word_embeddings:
        lm_head = embed
    elif isinstance(source, ShardedWeights) and source.base.config.tie_word_embeddings:
        # A rank of a tied model (its local config is untied): its LM head is its vocab rows of the
        # embedding table it holds whole, a view, neither read nor copied again.
        split = source.plan.split("lm_head", source.rank)
        lm_head = embed[split.start:split.stop]
    else:
        lm_head = lay.one("lm_head", "bf16")
    layers = []
    for i in range(cfg.num_hidden_layers):
        has = f"layers.{i}.q_bias" in names
        norms = f"layers.{i}.q_norm" in names
        layers.append(LayerWeights(
            attn_norm=lay.one(f"layers.{i}.attn_norm", "fp32"),
            qkv=lay.fused(i, "qkv", "bf16"),
            qkv_bias=lay.fused(i, "qkv_bias", "fp32") if has else None,
            q_norm=lay.one(f"layers.{i}.q_norm", "fp32") if norms else None,
            k_norm=lay.one(f"layers.{i}.k_norm", "fp32") if norms else None,
            o=lay.one(f"layers.{i}.o", "bf16"),
            mlp_norm=lay.one(f"layers.{i}.mlp_norm", "fp32"),
            gate_up=lay.fused(i, "gate_up", "bf16"),
            down=lay.one(f"layers.{i}.down", "bf16"),
        ))
    final_norm = lay.one("final_norm", "fp32")
    return DeviceWeights(embed, final_norm, lm_head, layers, lay.owned), lay


def _fill_synthetic(rt, source: SyntheticWeights, assign, stream) -> None:
    for name, dst in assign:
        if dst.dtype == "fp32":  # norms and biases: tiny, computed on the host
            dst.copy_from(np.ascontiguousarray(source.load(name, np.float32)))
        else:
            fill_synthetic_bf16(rt, source, name, dst, stream)


def upload(rt, source, stream, progress=None) -> DeviceWeights:
    """Every weight of ``source`` (a WeightSource) in the arena; on failure nothing stays allocated.

    ``progress(done_bytes, total_bytes)`` is called during a checkpoint load (default: a bar
    on stderr when it is a terminal and the load takes over a second).
    """
    weights, lay = _layout(source)
    try:
        if isinstance(source, ShardedWeights):  # a tensor-parallel rank: only its rows and columns
            weights.load_report = fill_shard(rt, source, lay.assign, stream, progress)
        elif isinstance(source, SyntheticWeights):
            _fill_synthetic(rt, source, lay.assign, stream)
        else:
            from ...models.streaming import LoadItem

            items = [LoadItem(source.ref(name), dst, convert=dst.dtype) for name, dst in lay.assign]
            weights.load_report = load_checkpoint(rt, items, progress)
        stream.synchronize()
    except BaseException:
        try:
            stream.synchronize()
        finally:
            weights.free()
        raise
    return weights
