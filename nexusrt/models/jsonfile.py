"""Reading the JSON files of a checkpoint with limits, and errors that name the file.

A checkpoint is input from strangers, so every JSON file is parsed under limits that no
real checkpoint comes near and that a hostile one cannot get past:

- size: at most ``max_bytes`` (default :data:`MAX_JSON_BYTES`) read, checked before parsing;
- depth: at most :data:`MAX_DEPTH` nested arrays/objects (deeper input used to escape as a
  ``RecursionError`` from the C parser);
- duplicate keys are an error, not "the last one wins" (a safetensors header naming a tensor
  twice loaded the last copy);
- ``NaN``, ``Infinity`` and numbers that overflow to infinity (``1e999``) are an error naming
  the key path: no field of a checkpoint may be non-finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModelError

MAX_JSON_BYTES = 64 * 1024 * 1024  # tokenizer_config.json with many added tokens is a few MB
MAX_DEPTH = 64  # real checkpoint files nest < 10 deep


def _no_duplicates(source: str):
    def hook(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ModelError(f"{source}: key {k!r} appears twice in one object")
            d[k] = v
        return d
    return hook


def _walk(value, source: str) -> None:
    """Depth and finiteness over the parsed value, iteratively (no recursion to exhaust)."""
    stack = [(value, "", 1)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ModelError(f"{source}: {where or 'the value'} is {v} (numbers must be finite)")
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise ModelError(f"{source}: nested deeper than {MAX_DEPTH} levels at {where or 'the top'}")
            if isinstance(v, dict):
                stack.extend((child, f"{where}.{k}" if where else str(k), depth + 1) for k, child in v.items())
            else:
                stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(v))


def parse_json(raw: bytes | str, source: str):
    """Parse ``raw`` (the whole document) under the depth, duplicate and finiteness rules."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        value = json.loads(text, object_pairs_hook=_no_duplicates(source))
    except UnicodeDecodeError as exc:
        raise ModelError(f"{source}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's own limit)
        raise ModelError(f"{source}: not a JSON document this loader takes ({exc})") from None
    _walk(value, source)
    return value


def read_bytes(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """At most ``max_bytes`` of a regular file; ModelError naming it when bigger or unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read this {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ModelError(f"{path}: larger than the {max_bytes}-byte limit for a {what}")
    return raw


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES):
    """Parse the JSON file ``path`` under the limits above."""
    if not Path(path).is_file():
        raise ModelError(f"{path}: missing")
    return parse_json(read_bytes(path, max_bytes, "JSON file"), str(path))


def read_json_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """:func:`read_json` that must give an object."""
    d = read_json(path, max_bytes)
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
