"""Where the prompt comes from: ``--prompt TEXT``, ``--prompt -`` (stdin) or ``--prompt-file F``."""

from __future__ import annotations

import sys

from .streams import require_stdin

MAX_PROMPT_BYTES = 64 * 1024 * 1024


def _decode(raw: bytes, where: str) -> str:
    if len(raw) > MAX_PROMPT_BYTES:
        raise ValueError(f"{where}: larger than the {MAX_PROMPT_BYTES}-byte prompt limit")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not valid UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None


def _read_stdin() -> bytes:
    """Up to the limit (and one byte more) of stdin; a closed or unreadable stdin is a ValueError."""
    require_stdin("--prompt - reads the prompt from it")
    try:
        return sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    except OSError as exc:  # e.g. stdin is a directory (EISDIR)
        raise ValueError(f"--prompt - (stdin): cannot read: {exc.strerror or exc}") from None


def read_prompt(args) -> str:
    """The prompt text; errors name the flag or the file."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                raw = f.read(MAX_PROMPT_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: {exc.strerror or exc}") from None
        return _decode(raw, f"--prompt-file {args.prompt_file}")
    if args.prompt == "-":
        return _decode(_read_stdin(), "--prompt - (stdin)")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise ValueError(f"--prompt: not valid UTF-8 text (position {exc.start})") from None
    return args.prompt
