"""Reading the JSON files of a checkpoint with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError


def read_json_object(path: Path) -> dict:
    """Parse ``path`` as a JSON object; ModelError naming the file if it is missing or malformed."""
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
