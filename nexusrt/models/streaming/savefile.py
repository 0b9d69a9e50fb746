"""Write a synthetic preset to disk as a Hugging Face checkpoint directory.

``save_synthetic_checkpoint("llama-3.1-8b", out_dir)`` writes ``config.json``, the
weights as safetensors (``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
shards with ``model.safetensors.index.json`` past ``shard_bytes``), a byte-level
``tokenizer.json`` + ``tokenizer_config.json``: everything ``load_model`` needs.

Values are those of :mod:`nexusrt.models.synthetic` for the same seed: embeddings and
linear weights as bf16 (round-to-nearest-even of the fp32 formula, exactly what the
CUDA runner generates), norms and biases as exact F32. On the CUDA backend the large
tensors are generated on the device by ``fill_uniform_bf16`` (bit-identical) and copied
back through a pinned buffer; elsewhere NumPy computes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from ... import runtime
from ...reference.synthetic import KIND_PARAMS, synthetic_values
from ..config import ModelConfig
from ..safetensors import DTYPES as ST_DTYPES
from ..synthetic import SyntheticWeights
from .writer import Entry, SafetensorsWriter, entry_nbytes

SHARD_BYTES = 5_000_000_000  # HF's default max_shard_size ("5GB")
INDEX_FILE = "model.safetensors.index.json"
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}
_COPY_BYTES = 256 << 20  # device -> host piece size on the CUDA path
_HOST_CHUNK = 1 << 22  # elements NumPy computes at once (bounds the temporaries)
BOS, EOS = "<s>", "</s>"


def hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` contents that ``load_config`` reads back as ``cfg``."""
    d = {
        "architectures": [cfg.architecture], "model_type": _MODEL_TYPES[cfg.architecture],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
    return d


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE tokenizers.

    Printable Latin-1 bytes stand for themselves; the rest take code points 256, 257, ...
    in byte order, so every byte has a visible, unique symbol.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_byte_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer: id b is byte b, then ``<s>`` (256) and ``</s>`` (257); no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
         "add_bos_token": False}, indent=2))


def _stored_dtype(kind: str) -> str:
    return "F32" if kind in ("norm", "bias") else "BF16"


def _shards(entries: list[tuple[Entry, object]], shard_bytes: int) -> list[list[tuple[Entry, object]]]:
    """Split in model order, a new shard whenever the next tensor would pass ``shard_bytes``."""
    shards, size = [[]], 0
    for e in entries:
        n = entry_nbytes(e[0])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def save_synthetic_checkpoint(preset_name: str, out_dir: str | Path, seed: int = 0, *,
                              shard_bytes: int = SHARD_BYTES, rt=None, host_only: bool = False,
                              sync: bool = True) -> Path:
    """Write preset ``preset_name`` (weights from ``seed``) as a checkpoint in ``out_dir``; returns it.

    ``rt`` defaults to the running runtime, if any: on the CUDA backend the large
    tensors are generated on the GPU (``host_only=True``: NumPy anyway, e.g. to compare).
    ``sync`` flushes each file to the disk.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    weights = SyntheticWeights.from_preset(preset_name, seed)
    cfg = weights.config
    if rt is None and runtime.is_initialized():
        rt = runtime.current()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [((s.hf_name, _stored_dtype(s.kind), tuple(s.shape)), s) for s in weights.specs()]
    shards = _shards(entries, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    gen = _GpuValues(rt, weights) if rt is not None and rt.is_cuda and not host_only else _HostValues(weights)
    try:
        for name, shard in zip(names, shards):
            # Within a file the reference library orders by dtype size, then by name.
            shard = sorted(shard, key=lambda e: (-ST_DTYPES[e[0][1]].itemsize, e[0][0]))
            with SafetensorsWriter(out / name, [e for e, _ in shard], {"format": "pt"}, sync=sync) as w:
                for (hf_name, dtype, _), spec in shard:
                    for piece in gen.pieces(spec, dtype):
                        w.write(hf_name, piece)
    finally:
        gen.close()
    if len(shards) > 1:
        total = sum(entry_nbytes(e) for e, _ in entries)
        wmap = {e[0]: name for name, shard in zip(names, shards) for e, _ in shard}
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    write_byte_tokenizer(out)
    return out


class _HostValues:
    """Tensor bytes computed with NumPy, a few million elements at a time."""

    def __init__(self, weights: SyntheticWeights):
        self.w = weights

    def pieces(self, spec, dtype: str):
        t, n = self.w.tensor_index(spec.name), int(np.prod(spec.shape))
        for start in range(0, n, _HOST_CHUNK):
            v = synthetic_values(self.w.seed, t, start, min(_HOST_CHUNK, n - start), spec.kind)
            yield v if dtype == "F32" else v.astype(ml_dtypes.bfloat16)

    def close(self) -> None:
        pass


class _GpuValues(_HostValues):
    """bf16 tensors generated on the device (``fill_uniform_bf16``) and copied out in pieces."""

    def __init__(self, rt, weights: SyntheticWeights):
        from ... import memory

        super().__init__(weights)
        self.rt = rt
        largest = max(int(np.prod(s.shape)) for s in weights.specs())
        self.dev = memory.empty((largest,), "bf16", tag="save_synthetic")
        try:
            self.host = memory.pinned((min(_COPY_BYTES, largest * 2),), "uint8", tag="save_synthetic")
        except BaseException:
            self.dev.free()
            raise

    def pieces(self, spec, dtype: str):
        if dtype == "F32":  # norms and biases: small, exact fp32 from the host formula
            yield from super().pieces(spec, dtype)
            return
        from ... import memory
        from ...kernels.ops import elementwise as ew

        n = int(np.prod(spec.shape))
        dev = self.dev[0:n]
        center, scale = KIND_PARAMS[spec.kind]
        stream = self.rt.streams["compute"]
        ew.fill_uniform_bf16(self.rt, dev, n, self.w.seed, scale, center,
                             tensor_index=self.w.tensor_index(spec.name)).launch(stream)
        stream.synchronize()
        raw, step = dev.view("uint8"), self.host.nbytes
        for a in range(0, 2 * n, step):
            b = min(a + step, 2 * n)
            memory.copy(self.host[0:b - a], raw[a:b])
            yield self.host.array[:b - a]

    def close(self) -> None:
        for t in (self.dev, self.host):
            if t.is_live:
                t.free()
