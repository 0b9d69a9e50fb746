"""Typed, range-checked reads of fields from a parsed JSON object.

Every value a checkpoint file gives NexusRT goes through one of these, so a wrong type or
an out-of-range value is a :class:`~nexusrt.errors.ModelError` naming the file and the key
(``config.json: tie_word_embeddings must be true or false, got 'false'``) instead of a
``TypeError`` deep in the loader, or worse, a silent coercion (``bool("false")`` is True).

``null`` counts as absent: HF writes ``"top_k": null`` for "not set".
"""

from __future__ import annotations

import builtins
import math
from typing import Any

from ..errors import ModelError

_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Fields:
    """Checked access to the keys of one JSON object ``d`` read from ``source``.

    ``prefix`` names a nested object in messages (``rope_scaling.factor``).
    """

    def __init__(self, d: Any, source: str, prefix: str = ""):
        if not isinstance(d, dict):
            raise ModelError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a JSON object, "
                             f"got {type(d).__name__}")
        self.d, self.source, self.prefix = d, source, prefix

    def fail(self, key: str, expected: str, value: Any) -> ModelError:
        """The error for ``key`` not being ``expected`` (names the file and the key)."""
        return ModelError(f"{self.source}: {self.prefix}{key} must be {expected}, got {_show(value)}")

    def has(self, key: str) -> bool:
        """The key is present and not null."""
        return self.d.get(key) is not None

    def _get(self, key: str, default: Any):
        value = self.d.get(key)
        if value is None:
            if default is _MISSING:
                raise ModelError(f"{self.source}: missing required key '{self.prefix}{key}'")
            return default, True
        return value, False

    def int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        """An integer (not a bool, not 2.0) within ``[lo, hi]``; ``default`` when absent."""
        value, absent = self._get(key, default)
        if absent:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(key, _range("an integer", lo, hi), value)
        return value

    def float(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              positive: bool = False) -> Any:
        """A finite number within ``[lo, hi]`` (``positive``: strictly above 0), as a float."""
        value, absent = self._get(key, default)
        if absent:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, "a finite number", value)
        if (positive and value <= 0) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(key, _range("a positive number" if positive else "a number", lo, hi), value)
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        """``true`` or ``false`` only: the string ``"false"`` is an error, not True."""
        value, absent = self._get(key, default)
        if not absent and not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def str(self, key: str, default: Any = _MISSING, choices=None) -> Any:
        """A string (one of ``choices`` when given); ``default`` when absent."""
        value, absent = self._get(key, default)
        if absent:
            return value
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        if choices is not None and value not in choices:
            raise self.fail(key, "one of " + ", ".join(map(repr, choices)), value)
        return value

    def ids(self, key: str, hi: int | None = None) -> tuple[int, ...] | None:
        """A token id or a list of them (``eos_token_id``); None when absent."""
        value, absent = self._get(key, None)
        if absent:
            return None
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (hi is None or v < hi)
                   for v in values):
            what = "a token id or a list of token ids" + (f" below the vocabulary size {hi}" if hi else " (>= 0)")
            raise self.fail(key, what, value)
        return tuple(values)

    def obj(self, key: str) -> "Fields | None":
        """A nested object as :class:`Fields`, or None when absent."""
        value, absent = self._get(key, None)
        if absent:
            return None
        return Fields(value, self.source, f"{self.prefix}{key}.")

    def list(self, key: str, item: type | None = None) -> Any:
        """A list whose items are all of type ``item`` (default: strings); None when absent."""
        item = item or builtins.str
        value, absent = self._get(key, None)
        if absent:
            return None
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise self.fail(key, f"a list of {item.__name__}", value)
        return value


def _range(what: str, lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"{what} in [{lo}, {hi}]"
    if lo is not None:
        return f"{what} >= {lo}"
    return f"{what} <= {hi}" if hi is not None else what
