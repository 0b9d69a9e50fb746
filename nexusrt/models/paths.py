"""Paths inside a checkpoint directory, and nothing outside it.

Names come from the checkpoint itself (a shard index's ``weight_map``, a glob), so they are
input from strangers: ``../other/model.safetensors``, ``/etc/passwd`` or a symlink to another
user's weights must not load. :class:`CheckpointDir` resolves every name it hands out and
refuses one that is absolute, has a ``..`` part, resolves (through symlinks) outside the
allowed roots, or is not a regular file (a FIFO would block a read forever, a device file
would read without end).

The allowed roots are the directory itself, the folders the caller trusts explicitly
(``allow``), and, for a snapshot in the Hugging Face cache layout
(``models--org--name/snapshots/<rev>/``), that repository folder: the cache keeps every
file as a symlink into ``models--org--name/blobs/``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import ModelError


def hf_repo_folder(real_dir: Path) -> Path | None:
    """``models--org--name`` above a snapshot directory in the HF cache layout, else None."""
    if real_dir.parent.name == "snapshots" and real_dir.parent.parent.name.startswith("models--"):
        return real_dir.parent.parent
    return None


def trusted_folders(allow) -> list:
    """``allow_paths`` checked: a list (or tuple) of non-empty folder paths. A bare string would be
    read character by character, and ``"/"`` among them would trust the whole filesystem."""
    if isinstance(allow, (str, bytes, os.PathLike)):
        raise TypeError(f"allow_paths must be a list of folders, got the single path {allow!r:.80} "
                        f"(write allow_paths=[{allow!r:.60}])")
    if not isinstance(allow, (list, tuple)):
        raise TypeError(f"allow_paths must be a list of folders, got {type(allow).__name__}")
    for a in allow:
        if not isinstance(a, (str, os.PathLike)) or not str(a):
            raise TypeError(f"allow_paths holds {a!r:.80}; each entry must be a non-empty folder path")
    return list(allow)


class CheckpointDir:
    """A checkpoint directory that hands out only safe paths inside it."""

    def __init__(self, root: str | Path, allow=()):
        self.root = Path(root)
        try:
            real = self.root.resolve(strict=True)
        except OSError as exc:
            raise ModelError(f"{root}: cannot open the checkpoint directory: {exc.strerror or exc}") from None
        if not real.is_dir():
            raise ModelError(f"{root}: not a directory (expected a checkpoint directory with config.json)")
        self.allowed = [real] + [Path(a).resolve() for a in trusted_folders(allow)]
        repo = hf_repo_folder(real)
        if repo is not None:
            self.allowed.append(repo)

    def __str__(self) -> str:
        return str(self.root)

    def file(self, name: str, required: bool = True, what: str = "file") -> Path | None:
        """The path of ``name`` inside the directory, checked; None when absent and not required.

        ``what`` says in a message what was being looked up (``shard``, ``tokenizer``).
        """
        if not isinstance(name, str) or not name:
            raise ModelError(f"{self.root}: {what} name must be a non-empty string, got {name!r}")
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
            raise ModelError(f"{self.root}: {what} {name!r} is outside the checkpoint directory "
                             "(absolute paths and '..' are not allowed)")
        path = self.root / name
        if not os.path.lexists(path):
            if required:
                raise ModelError(f"{path}: missing")
            return None
        real = path.resolve()
        if not any(real == a or a in real.parents for a in self.allowed):
            raise ModelError(f"{path}: resolves to {real}, outside the checkpoint directory {self.root} "
                             "(symlinks must stay inside it; pass allow_paths=[...] to trust another folder)")
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):
            raise ModelError(f"{path}: not a regular file")
        return path

    def glob(self, pattern: str) -> list[Path]:
        """Checked paths of the entries matching ``pattern``, sorted."""
        return [self.file(p.name) for p in sorted(self.root.glob(pattern))]
