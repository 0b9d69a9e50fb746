"""Find a Hugging Face repo id (``org/name``) in the local Hugging Face cache; never download.

The cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) keeps a
repo as ``models--org--name/`` with ``refs/<revision>`` naming a commit and
``snapshots/<commit>/`` holding the files (symlinks into ``blobs/``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with Hub-legal characters (and no ``..``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _read_ref(ref: Path) -> str:
    """A ref file's commit hash (40 hex digits and a newline), or "" for anything else: read at most
    a few bytes of it, so a huge or binary file there costs nothing (the newest snapshot is used)."""
    try:
        with open(ref, "rb") as f:
            raw = f.read(128)
    except OSError:
        return ""
    return raw.decode("ascii", errors="replace").strip()


def find_cached(repo_id: str, revision: str = "main") -> Path:
    """The snapshot directory of ``repo_id`` in the cache; ModelError saying how to fetch it if absent."""
    cache = hub_cache()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    fetch = (f"fetch it first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), "
             "or pass a checkpoint directory")
    if not repo.is_dir():
        raise ModelError(f"model {repo_id!r}: not a directory, and not in the Hugging Face cache ({cache}); {fetch}")
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    commit = _read_ref(ref) if ref.is_file() else ""
    if commit and re.fullmatch(r"[0-9a-f]{40}", commit) and (snapshots / commit).is_dir():
        return snapshots / commit
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    found = [p for p in found if p.is_dir() and (p / "config.json").exists()]
    if not found:
        raise ModelError(f"model {repo_id!r}: {repo} holds no complete snapshot; {fetch}")
    return found[-1]  # no usable ref: the newest snapshot that has a config
