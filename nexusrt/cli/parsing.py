"""Argument parsing for ``nexusrt`` and ``nexusrt-bench``: usage errors are one line and exit 1.

argparse's own ``error`` prints the whole usage block and exits with 2; the project's rule is
one line naming what was wrong and status 1 for every error, usage errors included. ``--help``
and ``--version`` are not errors and keep argparse's behaviour (full text, status 0).
"""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 1.

    The line reads ``ROOT: error: MESSAGE (see PROG --help)``, where ROOT is the command
    (``nexusrt``) even for a sub-command's parser (``nexusrt generate``), so every error of the
    program starts the same way, and PROG points at the help that lists the right flags.
    Sub-parsers made by ``add_subparsers`` are of this class too (argparse uses ``type(self)``).
    """

    def error(self, message: str):
        root = self.prog.split()[0]  # "nexusrt" of "nexusrt generate"
        text = " ".join(str(message).split())  # one line whatever argparse composed
        self.exit(1, f"{root}: error: {text} (see {self.prog} --help)\n")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """``(args, None)`` when ``argv`` parses, else ``(None, status)``: 0 after ``--help`` or
    ``--version``, 1 after a usage error (already said on stderr, in one line).

    argparse ends the process with ``SystemExit``; a ``main()`` that returns its status instead
    lets callers in the same process (tests, scripts) treat every outcome alike.
    """
    try:
        return parser.parse_args(argv), None
    except SystemExit as exc:
        return None, 0 if exc.code is None else int(exc.code)


def int_range(low: int, high: int | None = None):
    """An argparse ``type``: an integer in ``[low, high]`` (``high`` None: no upper bound).

    A value outside is refused at parse time with the range in the message
    (``argument --port: must be in 0..65535, got 99999``) instead of being clamped later,
    which would measure or serve something the user did not ask for.
    """
    allowed = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse
