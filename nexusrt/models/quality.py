"""Held-out perplexity: one quality figure for any runner (KV pruning, quantisation, new kernels).

The text is the evaluation files of ``nexusrt:stdlib-tiny`` (Python standard library modules
that no shipped model trained on), shipped as ``heldout.json.gz`` so the figure is the same
on every machine whatever its Python version. Each file is encoded with the model's own
tokenizer (BOS included, as for a prompt); the files' ids are concatenated, capped at
``max_tokens``, and cut into non-overlapping windows of ``window`` tokens run teacher-forced
(``runner.forward_all``). Within a window every token but the first is scored, so the
count of scored tokens is ``n - ceil(n / window)``.

Only the runner's ``forward_all(ids) -> [T, vocab]`` is used, so the models layer needs no
backend: HF transformers or any other callable with that shape can be measured the same way.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelError

HELDOUT_FILE = "heldout.json.gz"
DEFAULT_WINDOW = 512  # the shipped model's training sequence length


@dataclass(frozen=True)
class Perplexity:
    """``exp(nll / tokens)``: ``nll`` the summed negative log-likelihood (nats) of ``tokens`` scored ids."""

    perplexity: float
    nll: float
    tokens: int
    window: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "window": self.window}


def heldout_documents(model_dir: str | Path | None = None) -> list[dict]:
    """``[{"file", "text"}]`` of the held-out files (default: the shipped stdlib-tiny's, hash-checked)."""
    if model_dir is None:
        from .shipped import DEFAULT_MODEL, shipped_dir

        model_dir = shipped_dir(DEFAULT_MODEL)
    path = Path(model_dir) / HELDOUT_FILE
    try:
        docs = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (the held-out evaluation text)") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a gzip'd JSON list of documents ({exc})") from None
    if not isinstance(docs, list) or not all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
        raise ModelError(f"{path}: expected a list of {{'file', 'text'}} objects")
    return docs


def heldout_tokens(tokenizer, documents: list[dict], max_tokens: int | None = None) -> np.ndarray:
    """The documents' ids (each encoded with BOS, as a prompt is), concatenated, capped at ``max_tokens``."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one context token, one scored), got {max_tokens}")
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(doc["text"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int32)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed NLL (nats, float64) of ``ids[1:]`` under ``logits[:-1]`` (``logits``: ``[T, vocab]``)."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    if x.shape[0] != len(ids) - 1 or not np.isfinite(x).all():
        raise ValueError(f"logits of shape {np.shape(logits)} do not score {len(ids)} ids (or are not finite)")
    top = x.max(axis=-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexity(forward_all: Callable[[np.ndarray], np.ndarray], ids, window: int = DEFAULT_WINDOW) -> Perplexity:
    """Perplexity of ``forward_all`` (ids ``[T]`` -> fp32 logits ``[T, vocab]``) over ``ids`` in windows."""
    ids = np.asarray(ids, dtype=np.int32)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:  # a lone trailing id has nothing to be scored against
            break
        nll += window_nll(forward_all(chunk), chunk)
        count += len(chunk) - 1
    if count == 0:
        raise ValueError(f"{len(ids)} ids leave nothing to score")
    return Perplexity(math.exp(nll / count), nll, count, window)
