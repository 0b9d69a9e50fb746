"""Put a model's weights into the arena in the layout the kernels want.

Linear weights are bf16 ``[out, in]``; q/k/v are fused into one ``qkv`` matrix and gate/up
into one ``gate_up`` matrix (row order as :mod:`nexusrt.models.weights` documents), so a
decode step runs one GEMV per group. Norm weights and biases are small and kept fp32.

Checkpoint tensors stored as bf16 are copied as they are; fp32 (and fp16) tensors are
copied as stored into a staging tensor and converted to bf16 on the GPU. Synthetic
weights are generated on the device by ``fill_uniform_bf16``, bit-identical to the CPU
formula, so a 16 GB model appears in seconds without crossing PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from ... import memory
from ...kernels.ops import elementwise as ew
from ...models.synthetic import KIND_PARAMS, SyntheticWeights
from ...models.weights import FUSED

TAG = "weights"


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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.owned)

    def free(self) -> None:
        for t in self.owned:
            if t.is_live:
                t.free()
        self.owned.clear()


class _Uploader:
    def __init__(self, rt, source, stream):
        self.rt, self.source, self.stream = rt, source, stream
        self.synthetic = isinstance(source, SyntheticWeights)
        self.owned: list = []

    def alloc(self, shape, dtype):
        t = memory.empty(shape, dtype, tag=TAG)
        self.owned.append(t)
        return t

    def small(self, name: str):
        """A norm weight or bias as fp32 (computed or read on the host: it is tiny)."""
        t = memory.from_numpy(np.ascontiguousarray(self.source.load(name, np.float32)), tag=TAG)
        self.owned.append(t)
        return t

    def fused_small(self, layer: int, group: str):
        t = memory.from_numpy(np.ascontiguousarray(self.source.fused(layer, group, np.float32)), tag=TAG)
        self.owned.append(t)
        return t

    def linear_into(self, dst, name: str) -> None:
        """Fill ``dst`` (bf16, the tensor's full extent, contiguous) with weight ``name``."""
        spec = self.source.spec(name)
        n = int(np.prod(spec.shape))
        flat = dst.reshape(n)
        if self.synthetic:
            center, scale = KIND_PARAMS[spec.kind]
            ew.fill_uniform_bf16(self.rt, flat, n, self.source.seed, scale, center,
                                 tensor_index=self.source.tensor_index(name)).launch(self.stream)
            return
        stored = self.source.ref(name).dtype
        if stored == "BF16":
            flat.copy_from(self.source.load(name, ml_dtypes.bfloat16).reshape(n))
            return
        # fp32 / fp16: stage as fp32 on the device, convert there.
        with memory.from_numpy(self.source.load(name, np.float32).reshape(n), tag="staging") as tmp:
            ew.f32_to_bf16(self.rt, flat, tmp, n=n).launch(self.stream)
            self.stream.synchronize()

    def linear(self, name: str):
        spec = self.source.spec(name)
        t = self.alloc(spec.shape, "bf16")
        self.linear_into(t, name)
        return t

    def fused_linear(self, layer: int, group: str):
        parts = [f"layers.{layer}.{p}" for p in FUSED[group]]
        shapes = [self.source.spec(p).shape for p in parts]
        rows = sum(s[0] for s in shapes)
        t = self.alloc((rows, shapes[0][1]), "bf16")
        r0 = 0
        for p, s in zip(parts, shapes):
            self.linear_into(t[r0:r0 + s[0]], p)
            r0 += s[0]
        return t


def upload(rt, source, stream, progress=None) -> DeviceWeights:
    """Every weight of ``source`` (a WeightSource) in the arena; on failure nothing stays allocated."""
    cfg = source.config
    up = _Uploader(rt, source, stream)
    try:
        embed = up.linear("embed")
        lm_head = embed if cfg.tie_word_embeddings else up.linear("lm_head")
        layers = []
        names = set(s.name for s in source.specs())
        for i in range(cfg.num_hidden_layers):
            has = lambda short: f"layers.{i}.{short}" in names  # noqa: E731
            layers.append(LayerWeights(
                attn_norm=up.small(f"layers.{i}.attn_norm"),
                qkv=up.fused_linear(i, "qkv"),
                qkv_bias=up.fused_small(i, "qkv_bias") if has("q_bias") else None,
                q_norm=up.small(f"layers.{i}.q_norm") if has("q_norm") else None,
                k_norm=up.small(f"layers.{i}.k_norm") if has("k_norm") else None,
                o=up.linear(f"layers.{i}.o"),
                mlp_norm=up.small(f"layers.{i}.mlp_norm"),
                gate_up=up.fused_linear(i, "gate_up"),
                down=up.linear(f"layers.{i}.down"),
            ))
            if progress is not None:
                progress(i + 1, cfg.num_hidden_layers)
        final_norm = up.small("final_norm")
        stream.synchronize()
    except BaseException:
        stream.synchronize()
        for t in up.owned:
            if t.is_live:
                t.free()
        raise
    return DeviceWeights(embed, final_norm, lm_head, layers, up.owned)
