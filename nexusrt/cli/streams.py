"""Standard streams that were closed (``<&-``, ``>&-``, ``2>&-``) or cannot be used.

Python leaves ``sys.stdin``/``sys.stdout``/``sys.stderr`` as None when the descriptor was closed
at start-up, and a launcher (a shell script, a pyenv shim) may have put one of its own files
there, opened the wrong way. Either way the first use would be an ``AttributeError`` or EBADF,
reported as an internal error long after the model loaded. Instead:

* stderr only carries notices and errors: when it is unusable, they are dropped (os.devnull)
  and the command still does its work;
* stdin and stdout carry the prompt and the reply: a command that needs one that is closed
  fails at once, naming the stream, before anything loads.
"""

from __future__ import annotations

import io
import os
import sys

try:
    import fcntl
except ImportError:  # not on Windows: there we only see whether the stream is None
    fcntl = None


def _fd_mode_ok(fd: int, readable: bool) -> bool:
    """Whether descriptor ``fd`` is open for reading (``readable``) or for writing."""
    if fcntl is None:
        return True
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:  # EBADF: closed
        return False
    return mode == os.O_RDWR or mode == (os.O_RDONLY if readable else os.O_WRONLY)


def _fd_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def usable(stream, readable: bool) -> bool:
    """Whether ``stream`` (a ``sys.std*`` object) can be read (``readable``) or written.

    A stream without a descriptor (an ``io.StringIO``, a test's capture) is taken as usable:
    only a closed or wrongly opened descriptor is known to fail.
    """
    if stream is None:
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True
    return _fd_mode_ok(fd, readable)


def _plug(fd: int, flags: int) -> None:
    """Make descriptor ``fd`` an os.devnull opened with ``flags``."""
    null = os.open(os.devnull, flags)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def protect_standard_streams() -> None:
    """Call first thing in ``main``: plug closed descriptors 0 to 2 with os.devnull, and point
    ``sys.stderr`` at os.devnull when stderr cannot be written.

    A closed descriptor 0, 1 or 2 is the number the next ``open`` gets: a weight file or a socket
    would become "stdout", and native code writing warnings to descriptor 2 would write into it.
    ``sys.stdin``/``sys.stdout`` stay as Python found them (None), so :func:`require_stdin` and
    :func:`require_stdout` still see them closed. stderr only carries notices and errors, so an
    unusable one is replaced: without that, ``print(..., file=sys.stderr)`` with ``sys.stderr``
    None prints to stdout, into the completion, and a wrongly opened one fails the command.
    """
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY)):
        if fcntl is not None and not _fd_open(fd):
            _plug(fd, flags)
    if usable(sys.stderr, readable=False):
        return
    if not _fd_mode_ok(2, readable=False):
        _plug(2, os.O_WRONLY)
    sys.stderr = open(os.devnull, "w", encoding="utf-8")


def require_stdin(why: str) -> None:
    """Raise ValueError (one line: the stream and ``why`` it is needed) when stdin cannot be read."""
    if not usable(sys.stdin, readable=True):
        raise ValueError(f"stdin is closed: {why}")


def require_stdout(why: str) -> None:
    """Raise ValueError (one line: the stream and ``why`` it is needed) when stdout cannot be written."""
    if not usable(sys.stdout, readable=False):
        raise ValueError(f"stdout is closed: {why}")
