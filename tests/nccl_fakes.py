"""A recording stand-in for nccl4py's low-level module (``nccl.bindings.nccl``), for NcclGroup's
tests (``test_parallel_nccl``) and the CUDA rank's (``test_cuda_tp_cpu``, also inside spawned
workers). Each call appends a tuple to ``calls``; a communicator is the string ``"comm"``."""

from __future__ import annotations

import enum
import sys
import types


class DataType(enum.IntEnum):
    Int32 = 2
    Float16 = 6
    Float32 = 7
    Bfloat16 = 9


class RedOp(enum.IntEnum):
    Sum = 0


class Uid:
    def __init__(self, raw=bytes(range(128))):
        self.raw = raw

    def __bytes__(self):
        return self.raw

    @classmethod
    def from_buffer(cls, b):
        return cls(bytes(b))


class StreamHandle:
    """Stands for a ``cuda.bindings`` ``CUstream``: converts with ``int()`` but is not an int."""

    def __init__(self, value: int):
        self.value = value

    def __int__(self):
        return self.value


def _typed(args: tuple, *ints: int) -> tuple:
    """``args`` after the check nccl4py's Cython signatures make (pointers, counts, types and the
    stream are C integers): a non-int there raises TypeError there, as here."""
    for i in ints:
        if isinstance(args[i], bool) or not isinstance(args[i], int):
            raise TypeError(f"an integer is required (argument {i}: {type(args[i]).__name__})")
    return args


def modules(calls: list) -> dict[str, types.ModuleType]:
    """``{"nccl": ..., "nccl.bindings": ..., "nccl.bindings.nccl": ...}`` recording into ``calls``."""
    mod = types.ModuleType("nccl.bindings.nccl")
    mod.DataType, mod.RedOp, mod.UniqueId = DataType, RedOp, Uid
    mod.get_unique_id = lambda: Uid()
    mod.comm_init_rank = lambda n, uid, r: calls.append(("init", n, bytes(uid), r)) or "comm"
    mod.all_reduce = lambda *a: calls.append(("all_reduce", *_typed(a, 0, 1, 2, 3, 4, 6)))
    mod.all_gather = lambda *a: calls.append(("all_gather", *_typed(a, 0, 1, 2, 3, 5)))
    mod.comm_destroy = lambda c: calls.append(("destroy", c))
    mod.comm_abort = lambda c: calls.append(("abort", c))
    pkg, sub = types.ModuleType("nccl"), types.ModuleType("nccl.bindings")
    pkg.bindings, sub.nccl = sub, mod
    return {"nccl": pkg, "nccl.bindings": sub, "nccl.bindings.nccl": mod}


def install(calls: list) -> None:
    """Put the stand-in in ``sys.modules`` for good (a spawned worker's whole life)."""
    sys.modules.update(modules(calls))
