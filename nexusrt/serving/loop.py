"""The engine on a background thread: submit and cancel from any thread, results by callback.

Requests and cancels wait in an inbox that the loop thread applies between steps, so the
:class:`~nexusrt.serving.engine.Engine` itself is only ever touched by that thread. The
callbacks (``on_token``, ``on_finish``) run on it too: keep them short (hand the id to a
queue). ``max_waiting`` bounds the queue; beyond it :meth:`EngineLoop.submit` raises
:class:`QueueFull`, which a server turns into HTTP 429.
"""

from __future__ import annotations

import threading

from ..errors import NexusRTError
from .engine import Engine
from .sequence import Sequence, State


class QueueFull(NexusRTError):
    """More requests wait than the engine's ``max_waiting``."""


class EngineStopped(NexusRTError):
    """The engine loop is stopping or stopped and takes no new requests."""


class EngineLoop:
    """Runs ``engine`` on a daemon thread until :meth:`stop`."""

    def __init__(self, engine: Engine, max_waiting: int = 1024, name: str = "nexusrt-engine"):
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._cancels: list[Sequence] = []
        self._accepting = True
        self._stop = False
        self.error: BaseException | None = None  # what killed the loop, if anything did
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def submit(self, seq: Sequence) -> Sequence:
        """Queue ``seq``; ValueError when it can never fit, QueueFull / EngineStopped as said above."""
        self.engine.check(seq)
        with self._cond:
            if seq.queued or seq.done:  # a second submit would run one sequence twice and break the engine
                raise NexusRTError(f"sequence {seq.seq_id} was submitted already; submit a new request instead")
            if self.error is not None:
                raise EngineStopped(f"the engine stopped on an error and takes no new requests: {self.error}")
            if not self._accepting:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if self.num_waiting >= self.max_waiting:
                raise QueueFull(f"{self.num_waiting} requests are waiting (the limit is {self.max_waiting}); "
                                "retry later")
            seq.queued = True
            self._inbox.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End ``seq`` as cancelled at the next step boundary (nothing if it already ended)."""
        with self._cond:
            self._cancels.append(seq)
            self._cond.notify()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def idle(self) -> bool:
        with self._cond:
            return not (self._inbox or self._cancels or self.engine.has_work)

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop taking requests, cancel those still queued or running (at the end of the step
        running now), join the thread for up to ``timeout`` seconds (None: until it exits).
        True when the thread has exited."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or engine.has_work or self._stop):
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                    stopping = self._stop
                for seq in inbox:
                    engine.add(seq)
                for seq in cancels:
                    engine.cancel(seq)
                if stopping:
                    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                        engine.cancel(seq)
                    return
                engine.step()
        except BaseException as exc:  # a bug, or a FatalError from the runner: fail every sequence
            # rather than leave callers waiting
            self.error = exc
            with self._cond:
                inbox, self._inbox = self._inbox, []
            for seq in inbox:
                seq.state, seq.finish_reason, seq.error = State.FINISHED, "error", exc
                if seq.on_finish is not None:
                    try:  # one failing callback must not leave the other callers waiting
                        seq.on_finish(seq)
                    except BaseException:
                        pass
            for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                engine.end(seq, State.FINISHED, "error", exc)
