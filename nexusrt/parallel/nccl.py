"""NCCL collectives for one rank per process: the GPU side of tensor parallelism.

A rank decoder (:class:`~nexusrt.backends.cpu.sharded.RankDecoder` on the CPU) calls
``all_reduce`` after its row-parallel products and ``all_gather`` on its vocab slice of the
logits. On the GPU those are NCCL's, enqueued on the rank's own stream over arena tensors, so
they order with the step's kernels and can be captured in its CUDA graph. :class:`NcclGroup`
reaches NCCL through nccl4py's low-level bindings (``nccl.bindings.nccl``): raw device
pointers and stream handles, as the rest of the runtime speaks to the driver, and no
``cuda.core`` objects. The library itself (``libnccl.so.2``) comes from ``nvidia-nccl-cu13``.

**Start-up.** The front process makes one unique id (:func:`unique_id`, 128 bytes) and sends
it to every worker over its pipe; each worker makes its device current, then calls
``NcclGroup(rank, size, uid)``. Creation is collective: every rank must arrive.

**NVLink multicast (NVLS) stays off**: ``NCCL_NVLS_ENABLE=0`` is set in the process before the
first communicator is made (the lent machines do not support it; see the device notes).

Not yet run on a GPU: ``tests/test_parallel_nccl.py`` has a one-rank check for a single GPU
and a two-process one for a machine with two.
"""

from __future__ import annotations

import os

from ..errors import NexusRTError

NVLS_ENV = "NCCL_NVLS_ENABLE"
UID_BYTES = 128  # sizeof(ncclUniqueId)
_DTYPES = {"fp32": "Float32", "bf16": "Bfloat16", "fp16": "Float16", "int32": "Int32"}


class NcclError(NexusRTError):
    """An NCCL call failed; the message names the call, the rank and NCCL's own words."""


def _bindings():
    """nccl4py's low-level module, or a clear error saying how to get it."""
    try:
        from nccl.bindings import nccl  # optional: only tensor-parallel GPU runs need it
    except ImportError as e:
        raise NcclError("tensor parallelism on the GPU needs nccl4py with the NCCL library: "
                        f"pip install 'nccl4py[cu13]' ({e})") from None
    return nccl


def unique_id() -> bytes:
    """A fresh NCCL unique id as bytes, to send to every rank (the front process calls it once)."""
    os.environ[NVLS_ENV] = "0"
    b = _bindings()
    try:
        uid = b.get_unique_id()
    except Exception as e:  # NCCLError or a missing libnccl: reported the same way
        raise NcclError(f"ncclGetUniqueId failed: {e}") from None
    raw = bytes(uid)
    if len(raw) != UID_BYTES:
        raise NcclError(f"ncclGetUniqueId gave {len(raw)} bytes, expected {UID_BYTES}")
    return raw


class NcclGroup:
    """Rank ``rank`` of ``size`` over the unique id ``uid``, on the current device."""

    def __init__(self, rank: int, size: int, uid: bytes):
        for name, v in (("rank", rank), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a group of {size}")
        if not isinstance(uid, (bytes, bytearray)) or len(uid) != UID_BYTES:
            raise ValueError(f"uid must be the {UID_BYTES} bytes of unique_id(), got {type(uid).__name__} "
                             f"of {len(uid) if hasattr(uid, '__len__') else '?'}")
        os.environ[NVLS_ENV] = "0"  # before NCCL reads its environment for this communicator
        self.rank, self.size = rank, size
        self._b = _bindings()
        self._comm = None
        self._comm = self._call("ncclCommInitRank", self._b.comm_init_rank, size,
                                self._b.UniqueId.from_buffer(bytes(uid)), rank)

    def all_reduce(self, tensor, stream) -> None:
        """Sum ``tensor`` (a device tensor) over the ranks in place, enqueued on ``stream``."""
        count, dtype = self._check(tensor, "all_reduce")
        self._call("ncclAllReduce", self._b.all_reduce, tensor.ptr, tensor.ptr, count, dtype,
                   int(self._b.RedOp.Sum), self._live(), int(stream.handle))

    def all_gather(self, send, recv, stream) -> None:
        """Every rank's ``send`` into ``recv`` in rank order (``recv`` holds ``size`` times as many)."""
        count, dtype = self._check(send, "all_gather send")
        recv_count, recv_dtype = self._check(recv, "all_gather recv")
        if recv_dtype != dtype or recv_count != count * self.size:
            raise ValueError(f"all_gather: recv must be {send.dtype} of {count * self.size} elements "
                             f"({self.size} ranks x {count}), got {recv.dtype} of {recv_count}")
        self._call("ncclAllGather", self._b.all_gather, send.ptr, recv.ptr, count, dtype, self._live(),
                   int(stream.handle))  # nccl4py takes the stream as a C integer, not a CUstream

    def close(self, abort: bool = False) -> None:
        """Destroy the communicator (every rank must call it), or abort it after a failure."""
        comm, self._comm = self._comm, None
        if comm is not None:
            fn = self._b.comm_abort if abort else self._b.comm_destroy
            self._call("ncclCommAbort" if abort else "ncclCommDestroy", fn, comm)

    # -- helpers ------------------------------------------------------------------------------
    def _check(self, t, what: str) -> tuple[int, int]:
        if not getattr(t, "device", False):
            raise ValueError(f"{what}: NCCL needs a device tensor, got {t!r}")
        name = _DTYPES.get(getattr(t, "dtype", None))
        if name is None:
            raise ValueError(f"{what}: dtype {getattr(t, 'dtype', None)!r} is not one NCCL sums here "
                             f"({', '.join(_DTYPES)})")
        return int(t.numel), int(getattr(self._b.DataType, name))

    def _live(self):
        if self._comm is None:
            raise NcclError(f"rank {self.rank}: the NCCL communicator is closed")
        return self._comm

    def _call(self, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # nccl4py raises NCCLError; its message is what matters
            raise NcclError(f"{name} failed on rank {self.rank} of {self.size}: {e}") from None
