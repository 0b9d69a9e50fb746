"""Open a model by directory, by ``synthetic:<preset>`` name, or a shipped ``nexusrt:<name>``.

A checkpoint directory holds ``config.json``, ``*.safetensors`` (one file, or shards with
``model.safetensors.index.json``), ``tokenizer.json`` (+ ``tokenizer_config.json``) and
optionally ``generation_config.json``. Opening parses and checks every header and
shape but reads no tensor data: a runner loads the weights it needs from
:attr:`LoadedModel.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .config import ModelConfig, load_config
from .jsonfile import read_json_object
from .presets import PRESETS
from .safetensors import SafetensorsIndex
from .shipped import MANIFEST, PREFIX as SHIPPED_PREFIX, shipped_dir, shipped_names, verify_manifest
from .synthetic import SyntheticWeights
from .tokenizer import BaseTokenizer, ByteTokenizer, HFTokenizer
from .weights import CheckpointWeights, WeightSource

SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class GenerationDefaults:
    """What ``generation_config.json`` says: stop ids and sampling defaults.

    ``temperature`` is 0 (greedy) unless the file sets ``do_sample: true``; ``top_k`` 0
    means no top-k limit beyond the sampler's candidate cap.
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_file(cls, path: Path, fallback_eos: tuple[int, ...]) -> "GenerationDefaults":
        if not path.is_file():
            return cls(eos_token_ids=tuple(fallback_eos))
        d = read_json_object(path)
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else tuple(fallback_eos))
        sample = bool(d.get("do_sample", False))
        return cls(
            eos_token_ids=eos,
            temperature=float(d.get("temperature", 1.0) if sample else 0.0),
            top_k=int(d.get("top_k") or 0) if sample else 0,
            top_p=float(d.get("top_p", 1.0) or 1.0) if sample else 1.0,
            max_new_tokens=d.get("max_new_tokens"),
        )


@dataclass
class LoadedModel:
    """Everything a runner and the engine need; no tensor data is read yet."""

    name: str
    config: ModelConfig
    weights: WeightSource
    tokenizer: BaseTokenizer
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    path: Path | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.generation.eos_token_ids


def load_model(path_or_name: str | Path, seed: int = 0) -> LoadedModel:
    """Open a checkpoint directory, ``synthetic:<preset>`` (weights from ``seed``) or ``nexusrt:<name>``.

    A directory with a ``manifest.json`` (shipped models) has every file's SHA-256 checked first.
    """
    name = str(path_or_name)
    if name.startswith(SYNTHETIC_PREFIX):
        preset_name = name[len(SYNTHETIC_PREFIX):]
        if preset_name not in PRESETS:
            raise ModelError(f"unknown synthetic model {preset_name!r}; available: "
                             f"{', '.join([SYNTHETIC_PREFIX + p for p in PRESETS] + shipped_names())}")
        weights = SyntheticWeights.from_preset(preset_name, seed)
        # Synthetic weights are random: no eos, so benchmarks always run the asked length.
        return LoadedModel(name, weights.config, weights, ByteTokenizer(), GenerationDefaults())
    d = shipped_dir(name) if name.startswith(SHIPPED_PREFIX) else Path(name)  # shipped: hashes verified
    if not d.exists():
        raise ModelError(f"model {name!r}: no such directory (or use synthetic:<preset>, presets: "
                         f"{', '.join(PRESETS)}; or a shipped model: {', '.join(shipped_names())})")
    if not d.is_dir():
        raise ModelError(f"model {name!r}: not a directory (expected a checkpoint directory with config.json)")
    if (d / MANIFEST).is_file() and not name.startswith(SHIPPED_PREFIX):
        verify_manifest(d)  # e.g. a copy of a shipped model: still no silent use of a changed file
    config = load_config(d)
    tokenizer = HFTokenizer(d)
    weights = CheckpointWeights(config, SafetensorsIndex.from_dir(d))
    fallback = config.eos_token_ids or tokenizer.eos_ids
    gen = GenerationDefaults.from_file(d / "generation_config.json", fallback)
    return LoadedModel(name if name.startswith(SHIPPED_PREFIX) else d.name, config, weights, tokenizer, gen, d)
