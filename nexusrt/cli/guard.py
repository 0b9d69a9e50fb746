"""The top-level handler of both commands: no exception reaches the user as a traceback.

Every error becomes one line on stderr naming what was wrong, and an exit status: 1 for an
error, 130 for Ctrl-C, 0 when the reader of our stdout went away (``| head``). ``--debug``
or ``NEXUSRT_DEBUG=1`` prints the traceback first (``NEXUSRT_DEBUG`` also poisons freed
memory in the memory layer; both are for debugging).
"""

from __future__ import annotations

import os
import sys
import traceback

from ..errors import NexusRTError


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``NEXUSRT_DEBUG`` set to anything but empty or 0."""
    return flag or os.environ.get("NEXUSRT_DEBUG", "").strip() not in ("", "0")


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, in words, for any exception."""
    text = " ".join(str(exc).split("\n")[0].split()) if str(exc) else ""
    if isinstance(exc, (NexusRTError, ValueError, TypeError)) and not isinstance(exc, UnicodeError):
        return text or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''} (try a smaller model or --max-context)"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process (RecursionError)"
    if isinstance(exc, UnicodeEncodeError) and exc.encoding.replace("-", "").lower() != "utf8":
        return (f"cannot write the text in the output's encoding ({exc.encoding}): {text} "
                "(PYTHONIOENCODING=utf-8 or a UTF-8 locale writes it)")
    if isinstance(exc, UnicodeError):
        return f"invalid text: {text}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or text or type(exc).__name__}"
    return f"internal error: {type(exc).__name__}: {text} (run with --debug or NEXUSRT_DEBUG=1 for the traceback)"


def guarded(prog: str, fn, debug: bool = False) -> int:
    """Run ``fn() -> int`` and turn whatever escapes it into one line and an exit status."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`... | head`): not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        return 0
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- the point of this handler
        if debug_requested(debug):
            traceback.print_exc()
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return 1
