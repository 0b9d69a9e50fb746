"""Arguments and helpers shared by several benchmark stages.

``--model`` is used by the kernels and decode stages; both call :func:`add_model_argument`,
which registers it once per parser (argparse raises on a second registration).
"""

from __future__ import annotations

MODEL_DEFAULT = "synthetic:llama-3.2-1b"
SYNTHETIC_PREFIX = "synthetic:"


def add_model_argument(parser) -> None:
    """Add ``--model`` to ``parser`` unless a stage already did."""
    if "--model" in getattr(parser, "_option_string_actions", {}):
        return
    parser.add_argument("--model", default=MODEL_DEFAULT, metavar="MODEL",
                        help="kernels/decode/load/quality stages: 'synthetic:<preset>' (e.g. synthetic:llama-3.1-8b), "
                             f"nexusrt:stdlib-tiny or a checkpoint directory (default {MODEL_DEFAULT})")


def resolve_model_config(spec: str):
    """The ModelConfig of ``spec``: ``synthetic:<preset>``, a bare preset name, ``nexusrt:<name>`` or a dir."""
    from pathlib import Path

    from ..models.config import load_config
    from ..models.presets import PRESETS, preset
    from ..models.shipped import PREFIX, shipped_dir, shipped_names

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--model must be 'synthetic:<preset>' or a checkpoint directory, got {spec!r}")
    if spec.startswith(SYNTHETIC_PREFIX):
        return preset(spec[len(SYNTHETIC_PREFIX):])
    if spec in PRESETS:
        return preset(spec)
    if spec.startswith(PREFIX):
        return load_config(shipped_dir(spec))
    if Path(spec).is_dir():
        return load_config(spec)
    raise ValueError(f"--model {spec!r} is neither synthetic:<preset> ({', '.join(PRESETS)}), "
                     f"a shipped model ({', '.join(shipped_names())}) nor a checkpoint directory")
