"""Worker processes of a tensor-parallel group, seen from the front process: start, ask, stop.

:class:`WorkerGroup` starts one process per rank (``spawn``: a fresh interpreter, no forked
threads or device state) running ``target(rank, conn, *args)``, talks to each over its own
pipe, and owns their lifetimes. It knows nothing of models: the CPU rank loop lives in
:mod:`nexusrt.backends.cpu.tp_worker`, and a CUDA one would be another ``target``.

The protocol: every request goes to every rank; a rank answers ``("ok", value)`` or
``("error", exception)``. A request is pickled once and its bytes sent to every rank
(``Connection.send`` would pickle it again per rank); a rank reads it with ``conn.recv()``,
which unpickles exactly what ``send_bytes`` sent. :meth:`WorkerGroup.request` waits on the
pipes *and* the process sentinels, so a rank that dies (killed, crashed, out of memory) is seen at once: the group
raises :class:`WorkerDied` naming the rank and its exit code, and stops every other rank
first, so no process is left behind. Errors every rank raised alike (a bad token id, checked
before any collective) are re-raised and the group stays usable; a rank erring alone means
the ranks are out of step, and the group is stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

from ..errors import FatalError, NexusRTError
from .comm import check_repeats

STOP_GRACE = 5.0  # seconds a rank gets to exit after SIGTERM before SIGKILL
# Seconds the other ranks get to answer once one rank has answered a request: the ranks meet at
# every collective, so they finish a step together; one that stays silent this long (stopped,
# not dead) is reported instead of waited for forever. Generous: a request that compiles
# kernels in every rank (a CUDA batch runner's first graphs) may end minutes apart on a cold cache.
ANSWER_GRACE = 300.0
DRAIN_S = 10.0  # seconds an interrupted request waits for the step the ranks are running to end
_ENV_LOCK = threading.Lock()  # one group at a time changes os.environ while its children start


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold a Ctrl-C that comes inside the block until the block ends, then raise it.

    A pipe message is written and read in several system calls; a KeyboardInterrupt between them
    leaves half a message in the pipe, and the ranks and the front out of step for good. Only the
    main thread gets KeyboardInterrupt, and only Python's own handler is swapped: a program's own
    SIGINT handler is left alone (an exception it raises mid-message stops the group)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class WorkerDied(FatalError):
    """A worker process exited or failed mid-request; the message names the rank and exit code.
    The group is stopped by then, so it is fatal: every later request raises it again."""


def describe_exit(code: int | None) -> str:
    """``exit code 3`` / ``killed by SIGKILL`` / ``still running`` for a process's exitcode."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


class RankFront:
    """What a front process over a :class:`WorkerGroup` of ranks answers alike on every backend;
    the front sets ``plan`` (its :class:`~nexusrt.parallel.ShardPlan`) and ``_workers``."""

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return self.plan.size

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, rank order."""
        return self._workers.pids

    def _request(self, message, what: str) -> list:
        """Every rank's answer to ``message``, rank order (a front may add its own cleanup)."""
        return self._workers.request(message, what)

    def collective_times(self, repeats: int) -> list[dict]:
        """Every rank's timing of a decode step's collectives alone, ``repeats`` times, rank order
        (each rank's ``collective_times`` message says what it times and with which clock)."""
        check_repeats(repeats)  # refused here: a bad count must not reach only some ranks
        return self._request(("collective_times", repeats), "collective timing")


class WorkerGroup:
    """``size`` worker processes running ``target(rank, conn, *args)``; ``name`` labels messages;
    ``env``: variables the workers start with (a spawned child reads the environment when it
    imports its libraries, before ``target`` runs: BLAS thread counts must be set this way).

    The constructor returns once every rank has answered its first message (its ``ready``
    value, e.g. after loading its shard), kept in :attr:`ready`; a rank that fails or dies
    while starting stops the group and raises.
    """

    def __init__(self, target, size: int, args: tuple = (), name: str = "worker",
                 env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self.name, self.size = name, size
        self._procs, self._conns = [], []
        self._closed = False
        self._lock = threading.Lock()
        self.failure: WorkerDied | None = None  # what stopped the group, once something has
        try:
            with _ENV_LOCK:
                saved = {k: os.environ.get(k) for k in env or {}}
                os.environ.update(env or {})
                try:
                    for rank in range(size):
                        self._start(ctx, target, rank, args)
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            self.ready = self._unpack(self._collect("start", {}), "start")
        except BaseException:
            self.close()
            raise

    def _start(self, ctx, target, rank: int, args: tuple) -> None:
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=target, args=(rank, theirs, *args), name=f"{self.name}-rank{rank}", daemon=True)
        proc.start()
        theirs.close()  # the child holds its end; ours sees EOF when the child dies
        self._procs.append(proc)
        self._conns.append(ours)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, rank order."""
        return [p.pid for p in self._procs]

    def request(self, message, what: str = "request") -> list:
        """Send ``message`` to every rank; their answers, rank order (see the module's protocol).

        A KeyboardInterrupt while the ranks run it is re-raised as it is, once they have answered
        (within :data:`DRAIN_S`): the group stays usable. A Ctrl-C never cuts a message in half
        (it waits for the send or the read to end); one whose step does not end in time stops
        the group first (later requests raise :class:`WorkerDied`), as does any other exception
        raised mid-request (a program's own SIGINT handler's, say)."""
        with self._lock:  # one request at a time: the pipes carry no request ids
            # Checked under the lock: a thread that waited here while another's request found a
            # dead rank must report that rank, not the pipes the stop has closed since.
            if self.failure is not None:  # every later call names the rank that died, not just "closed"
                raise WorkerDied(str(self.failure))
            if self._closed:
                raise NexusRTError(f"{self.name} group is closed")
            sent = 0
            answers: dict[int, tuple] = {}  # filled as they come: a drain goes on from there
            try:
                payload = ForkingPickler.dumps(message)  # once, not once per rank
                with _ctrl_c_deferred():  # a message cut halfway would leave the pipe out of step
                    for rank, conn in enumerate(self._conns):
                        try:
                            conn.send_bytes(payload)
                        except (BrokenPipeError, OSError):
                            self._fail(rank, what)
                        sent += 1
                self._collect(what, answers, grace=ANSWER_GRACE)
            except WorkerDied:
                raise
            except KeyboardInterrupt:
                if sent == 0:  # nothing reached the ranks: they wait for a request, in step
                    raise
                if sent < self.size or not self._drain(what, answers):
                    self._stop_all()
                    self._failed(f"{self.name} group stopped: the {what} was interrupted (KeyboardInterrupt)")
                raise
            except BaseException as exc:  # interrupted mid-request: answers may still be in the pipes
                self._stop_all()
                raise self._failed(f"{self.name} group stopped: the {what} was interrupted "
                                   f"({type(exc).__name__})") from exc
            return self._unpack(answers, what)

    def _drain(self, what: str, answers: dict[int, tuple]) -> bool:
        """After an interrupt: read (and drop) the answers still to come to the request the ranks
        are running (``answers``: those already read); True when all came within :data:`DRAIN_S`
        (the ranks are in step again)."""
        try:
            self._collect(what, answers, timeout=DRAIN_S, grace=ANSWER_GRACE)
        except (WorkerDied, KeyboardInterrupt):  # a rank died meanwhile, or a second Ctrl-C: stop
            return False
        return len(answers) == self.size

    def _collect(self, what: str, answers: dict[int, tuple], timeout: float | None = None,
                 grace: float | None = None) -> dict[int, tuple]:
        """Read every rank's answer to the request just sent into ``answers`` (rank → answer; it
        may hold some already), or WorkerDied for the first that died (or that stays silent
        ``grace`` seconds after another answered; None: no such bound, as while the ranks load
        their shards). ``timeout``: stop with the answers that came within it (a drain)."""
        end = None if timeout is None else time.monotonic() + timeout
        while len(answers) < self.size:
            pending = [r for r in range(self.size) if r not in answers]
            # Once a rank has failed, the others either fail alike at once (a bad input every rank
            # checks) or are stuck mid-collective: they get STOP_GRACE, not forever.
            erred = any(a[0] == "error" for a in answers.values())
            limit = STOP_GRACE if erred else grace if answers else None
            if end is not None:
                left = max(0.0, end - time.monotonic())
                limit = left if limit is None else min(limit, left)
            ready = wait([self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending], limit)
            if not ready:
                if erred or end is not None:  # _unpack names the rank that failed alone; a drain counts
                    return answers
                r = pending[0]  # alive but silent while another rank has answered: stopped or stuck
                self._stop_all()
                raise self._failed(f"{self.name} rank {r} (pid {self._procs[r].pid}) did not answer the {what} "
                                   f"within {limit:g} s of rank {min(answers)} (stopped or stuck); every "
                                   "rank was stopped")
            for r in pending:
                if self._conns[r] in ready:  # an answer before the death is still an answer
                    try:
                        with _ctrl_c_deferred():  # an answer read halfway could not be resumed
                            answers[r] = self._conns[r].recv()
                    except (EOFError, OSError):
                        self._fail(r, what)
                elif self._procs[r].sentinel in ready:
                    self._fail(r, what)
        return answers

    def _unpack(self, answers: dict[int, tuple], what: str) -> list:
        errors = {r: a[1] for r, a in answers.items() if a[0] == "error"}
        if errors and len(errors) < self.size:  # a rank failed alone: the others are out of step
            r, exc = next(iter(errors.items()))
            self._stop_all()
            raise self._failed(f"{self.name} rank {r} failed during the {what} ({type(exc).__name__}: {exc}); "
                               "every rank was stopped") from exc
        if errors:
            raise errors[0]
        return [a[1] for _, a in sorted(answers.items())]

    def _fail(self, rank: int, what: str):
        proc = self._procs[rank]
        proc.join(1.0)  # the sentinel fired, or the pipe closed: the exit code follows at once
        self._stop_all()
        # The usual way to die at the start: a script without the main guard, which every
        # spawned worker imports again (Python prints why above, once per rank).
        hint = (" (workers are spawned processes that import the main script: a script that starts them needs "
                "the `if __name__ == \"__main__\":` guard; the worker's own error is printed above)"
                if what == "start" and proc.exitcode == 1 else "")
        raise self._failed(f"{self.name} rank {rank} (pid {proc.pid}) died during the {what}: "
                           f"{describe_exit(proc.exitcode)}; every rank was stopped{hint}")

    def _failed(self, message: str) -> WorkerDied:
        """The group's failure: the first one found stays (a later symptom, such as the pipes the
        stop closed, must not replace the rank that died)."""
        if self.failure is None:
            self.failure = WorkerDied(message)
        return self.failure

    def _stop_all(self) -> None:
        """Terminate and reap every rank (SIGTERM, then SIGKILL after :data:`STOP_GRACE`)."""
        self._closed = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(STOP_GRACE)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()

    def close(self, message=None) -> None:
        """Ask every rank to exit with ``message`` (if given), wait a little, then stop any left.
        Safe to call twice."""
        if self._closed:
            return
        if message is not None:
            payload = ForkingPickler.dumps(message)
            for conn, proc in zip(self._conns, self._procs):
                try:
                    if proc.is_alive():
                        conn.send_bytes(payload)
                except (BrokenPipeError, OSError):
                    pass  # already gone: _stop_all reaps it
            for proc in self._procs:
                proc.join(STOP_GRACE)
        self._stop_all()
