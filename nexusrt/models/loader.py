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
from .hub import find_cached, looks_like_repo_id
from .jsonfile import read_json_object
from .paths import CheckpointDir
from .presets import PRESETS, preset
from .safetensors import SafetensorsIndex
from .shipped import MANIFEST, PREFIX as SHIPPED_PREFIX, shipped_dir, shipped_names, verify_manifest
from .synthetic import SyntheticWeights
from .tokenizer import BaseTokenizer, ByteTokenizer, HFTokenizer
from .validate import Fields
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
    def from_file(cls, path: Path | None, fallback_eos: tuple[int, ...],
                  vocab_size: int | None = None) -> "GenerationDefaults":
        """Read ``generation_config.json`` (``None`` or absent: the defaults with ``fallback_eos``).

        Every key NexusRT uses is type- and range-checked, sampling or not: ``top_p: 0`` is an
        error naming the file and key, not a silent 1.0.
        """
        if path is None or not Path(path).is_file():
            return cls(eos_token_ids=tuple(fallback_eos))
        f = Fields(read_json_object(path), str(path))
        eos = f.ids("eos_token_id", hi=vocab_size)
        sample = f.bool("do_sample", False)
        temperature = f.float("temperature", 1.0, lo=0.0)
        top_k = f.int("top_k", 0, lo=0)
        top_p = f.float("top_p", 1.0, hi=1.0, positive=True)
        return cls(
            eos_token_ids=tuple(fallback_eos) if eos is None else eos,
            temperature=temperature if sample else 0.0,
            top_k=top_k if sample else 0,
            top_p=top_p if sample else 1.0,
            max_new_tokens=f.int("max_new_tokens", None, lo=1),
        )


@dataclass(frozen=True)
class WeightsOrigin:
    """Where a model's weights come from, already resolved: a checkpoint directory (its manifest,
    if any, already verified) or ``synthetic:<preset>`` with its ``seed``. Picklable, so a
    tensor-parallel worker opens the same weights without resolving the name or hashing again."""

    where: str
    seed: int = 0
    allow_paths: tuple = ()

    def open(self) -> WeightSource:
        """Just the weights: no name lookup, no hashing, no tokenizer or generation config."""
        if self.where.startswith(SYNTHETIC_PREFIX):
            return SyntheticWeights.from_preset(self.where[len(SYNTHETIC_PREFIX):], self.seed)
        files = CheckpointDir(Path(self.where), allow=self.allow_paths)
        return _checkpoint_weights(files, load_config(files))


def _checkpoint_weights(files: CheckpointDir, config: ModelConfig) -> CheckpointWeights:
    return CheckpointWeights(config, SafetensorsIndex.from_dir(files))


@dataclass
class LoadedModel:
    """Everything a runner and the engine need; no tensor data is read yet."""

    name: str
    config: ModelConfig
    weights: WeightSource
    tokenizer: BaseTokenizer
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    path: Path | None = None
    origin: WeightsOrigin | None = None  # how to open these weights again (a worker process does)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.generation.eos_token_ids


def preset_name(name: str) -> str | None:
    """The synthetic preset ``name`` asks for: ``synthetic:<preset>``, or a bare preset name that is
    no path on disk; None when it names something else. An unknown ``synthetic:`` preset raises."""
    if name.startswith(SYNTHETIC_PREFIX):
        preset_name = name[len(SYNTHETIC_PREFIX):]
        if preset_name not in PRESETS:
            raise ModelError(f"unknown synthetic model {preset_name!r}; available: "
                             f"{', '.join([SYNTHETIC_PREFIX + p for p in PRESETS] + shipped_names())}")
        return preset_name
    return name if name in PRESETS and not Path(name).exists() else None


def locate(name: str) -> tuple[Path, str]:
    """The checkpoint directory ``name`` names and a label for it: a shipped ``nexusrt:<name>``
    (hashes verified), a directory, or a Hugging Face repo id ``org/name`` in the local cache."""
    if name.startswith(SHIPPED_PREFIX):
        return shipped_dir(name), name
    if not name.strip():  # Path("") is the working directory: not what an empty --model meant
        raise ModelError(f"model name {name!r} is empty: name a checkpoint directory, synthetic:<preset>, a shipped "
                         f"model ({', '.join(shipped_names())}) or a Hugging Face repo id org/name")
    d = Path(name)
    if not d.exists() and looks_like_repo_id(name):
        return find_cached(name), name
    if not d.exists():
        raise ModelError(f"model {name!r}: no such directory (or use synthetic:<preset>, presets: "
                         f"{', '.join(PRESETS)}, a shipped model: {', '.join(shipped_names())}, "
                         "or a Hugging Face repo id org/name in the local cache)")
    return d, d.name


def model_config(path_or_name: str | Path, allow_paths=()):
    """The ModelConfig of any model name :func:`load_model` takes, reading only its config."""
    name = str(path_or_name)
    p = preset_name(name)
    if p is not None:
        return preset(p)
    d, _ = locate(name)
    return load_config(CheckpointDir(d, allow=allow_paths))


def load_model(path_or_name: str | Path, seed: int = 0, allow_paths=()) -> LoadedModel:
    """Open a checkpoint directory, ``synthetic:<preset>`` (weights from ``seed``; a bare preset
    name too), a shipped ``nexusrt:<name>``, or a Hugging Face repo id ``org/name`` found in the
    local Hugging Face cache (nothing is downloaded).

    Every file is read from inside the directory (see :mod:`nexusrt.models.paths`);
    ``allow_paths`` lists further folders its symlinks may lead into. A shipped model, and a
    directory whose ``manifest.json`` lists SHA-256s (e.g. a copy of one), has every listed
    file's hash checked first.
    """
    name = str(path_or_name)
    p = preset_name(name)
    if p is not None:
        origin = WeightsOrigin(SYNTHETIC_PREFIX + p, seed)
        weights = origin.open()
        # Synthetic weights are random: no eos, so benchmarks always run the asked length.
        return LoadedModel(origin.where, weights.config, weights, ByteTokenizer(), GenerationDefaults(),
                           origin=origin)
    d, label = locate(name)
    files = CheckpointDir(d, allow=allow_paths)
    if not name.startswith(SHIPPED_PREFIX) and files.file(MANIFEST, required=False) is not None:
        if isinstance(read_json_object(files.file(MANIFEST)).get("sha256"), dict):
            verify_manifest(d, files)  # a copy of a shipped model: still no silent use of a changed file
    config = load_config(files)
    tokenizer = HFTokenizer(d, files)
    weights = _checkpoint_weights(files, config)
    fallback = config.eos_token_ids or tokenizer.eos_ids
    gen = GenerationDefaults.from_file(files.file("generation_config.json", required=False), fallback,
                                       config.vocab_size)
    return LoadedModel(label, config, weights, tokenizer, gen, d,
                       WeightsOrigin(str(d), seed, tuple(str(a) for a in allow_paths)))
