"""A worker target for WorkerGroup's tests (answers by the protocol, fails or hangs on request)
and :func:`gone`. Imports nothing heavy, so a spawned process starts in a fraction of a second."""

from __future__ import annotations

import os
import time


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists any more (exited and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def fake_rank(rank: int, conn, boot_fails: bool = False, dies_at_start: bool = False) -> None:
    if dies_at_start:  # as a spawned child of a script without the main guard does
        raise SystemExit(1)
    if boot_fails:
        conn.send(("error", ValueError(f"rank {rank} cannot load its shard")))
        return
    conn.send(("ok", rank))
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "close":
            return
        if kind == "echo":
            conn.send(("ok", (rank, message[1])))
        elif kind == "fail_all":
            conn.send(("error", ValueError("token ids must be in [0, 512)")))
        elif kind == "fail_alone":  # the others hang as if waiting in a collective for the failed rank
            if rank == message[1]:
                conn.send(("error", RuntimeError("out of step")))
            else:
                time.sleep(600)
        elif kind == "slow":  # a step that takes a while (every rank)
            time.sleep(message[1])
            conn.send(("ok", rank))
        elif kind == "stall":  # one rank stops answering, alive (as a SIGSTOPped process)
            if rank == message[1]:
                time.sleep(600)
            conn.send(("ok", rank))
        elif kind == "exit":
            if rank == message[1]:
                raise SystemExit(3)
            conn.send(("ok", None))
