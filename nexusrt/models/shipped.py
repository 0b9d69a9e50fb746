"""Models that ship inside the package (``nexusrt:<name>``), checked against their manifest.

A shipped model is an HF checkpoint directory under ``nexusrt/models/<dir>/`` with a
``manifest.json`` written by ``scripts/train_reference.py``: how it was trained, on which
files, and the SHA-256 of every file. Loading verifies every hash first, so a corrupted
or edited file is an error naming that file, never a silently different model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelError
from .jsonfile import read_json_object

PREFIX = "nexusrt:"
DEFAULT_MODEL = "nexusrt:stdlib-tiny"
_HERE = Path(__file__).resolve().parent
SHIPPED: dict[str, Path] = {
    # A 4-layer Llama trained on the Python standard library's source (scripts/train_reference.py).
    "stdlib-tiny": _HERE / "stdlib_tiny",
}
# A manifest must vouch for these; one that leaves a file out cannot wave it through.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")
MANIFEST = "manifest.json"


def shipped_names() -> list[str]:
    """``nexusrt:<name>`` of every shipped model."""
    return [PREFIX + n for n in SHIPPED]


def shipped_dir(name: str) -> Path:
    """The directory of ``nexusrt:<name>`` (or bare ``<name>``), hashes verified.

    Raises ModelError listing the shipped models for an unknown name, or naming the file
    whose hash does not match.
    """
    from .presets import PRESETS

    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in SHIPPED:
        raise ModelError(f"unknown model {name!r}; available: "
                         f"{', '.join(shipped_names() + ['synthetic:' + p for p in PRESETS])}")
    d = SHIPPED[key]
    verify_manifest(d)
    return d


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: str | Path) -> dict:
    """The parsed ``manifest.json`` of ``model_dir`` (ModelError naming it if missing or malformed)."""
    return read_json_object(Path(model_dir) / MANIFEST)


def verify_manifest(model_dir: str | Path, files=None) -> dict:
    """Check every file listed in ``model_dir/manifest.json`` against its SHA-256; return the manifest.

    The manifest must list each of :data:`REQUIRED_FILES`; a missing file or a different
    hash raises ModelError naming the file. ``files`` (a :class:`~nexusrt.models.paths.CheckpointDir`
    of a user's directory) resolves each name with the loader's path rules (no symlink out).
    Shipped models are hashed once per process while their files keep their size and mtime.
    """
    d = Path(model_dir)
    manifest = read_manifest(d)
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict):
        raise ModelError(f"{d / MANIFEST}: no 'sha256' table of file hashes")
    unlisted = [f for f in REQUIRED_FILES if f not in hashes]
    if unlisted:
        raise ModelError(f"{d / MANIFEST}: no hash for {', '.join(unlisted)}")
    paths = {}
    for rel in hashes:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ModelError(f"{d / MANIFEST}: file name {rel!r} leaves the model directory")
        path = files.file(rel, required=False, what="manifest entry") if files is not None else d / rel
        if path is None or not path.is_file():
            raise ModelError(f"{d / rel}: missing (listed in {MANIFEST})")
        paths[rel] = path
    stamp = tuple((rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in sorted(paths.items()))
    if _VERIFIED.get(d.resolve()) == stamp:
        return manifest
    for rel, want in hashes.items():
        got = file_sha256(paths[rel])
        if got != want:
            raise ModelError(f"{paths[rel]}: SHA-256 {got} does not match the manifest's {want}: the file is "
                             "corrupted or was changed; reinstall nexusrt")
    _VERIFIED[d.resolve()] = stamp
    return manifest


# Directories whose hashes matched, with their files' (name, size, mtime) then: a bench stage
# or server resolves the same model several times and need not hash 8 MB each time.
_VERIFIED: dict[Path, tuple] = {}
