"""The worker side of :class:`~nexusrt.parallel.procs.WorkerGroup`'s protocol: boot, then answer.

Every rank loop (the CPU one in :mod:`nexusrt.backends.cpu.tp_worker`, the CUDA one in
:mod:`nexusrt.backends.cuda.tp_worker`) is :func:`serve_requests` with its own ``boot``: the
process answers its boot with ``("ok", ready)`` or ``("error", exception)``, then each
message with ``("ok", value)`` or ``("error", exception)``, until ``("close",)`` or its pipe
closes, and releases what it booted on the way out however it leaves.
"""

from __future__ import annotations

import pickle
import signal


def answerable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the front re-raises it as is), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def serve_requests(conn, boot) -> None:
    """A worker process's main. ``boot()`` returns ``(handle, release, ready)``: ``handle(message)``
    answers one message, ``release()`` frees what boot made, ``ready`` is the boot's answer."""
    # The front stops a group with SIGTERM; Ctrl-C in a terminal reaches the whole process
    # group, and only the front decides what happens to a step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        handle, release, ready = boot()
    except BaseException as exc:
        _send(conn, ("error", answerable(exc)))
        return
    try:
        if not _send(conn, ("ok", ready)):
            return
        while True:
            try:
                message = conn.recv()  # unpickles the bytes the front pickled once for every rank
            except (EOFError, OSError):  # the front is gone (it exited, or was killed)
                return
            if message[0] == "close":
                return
            try:
                answer = ("ok", handle(message))
            except Exception as exc:  # the front decides: re-raise if every rank failed alike
                answer = ("error", answerable(exc))
            if not _send(conn, answer):
                return
    finally:
        release()


def _send(conn, answer) -> bool:
    """Send ``answer`` to the front; False when the front is gone (a killed front left a broken pipe,
    which used to end every worker with a traceback on the terminal)."""
    try:
        conn.send(answer)
    except OSError:  # BrokenPipeError, ConnectionResetError
        return False
    except Exception as exc:  # the answer does not pickle (nothing was written): the front gets that
        return _send(conn, ("error", answerable(exc)))
    return True
