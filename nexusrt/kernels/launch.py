"""Loaded kernels and their launches.

A :class:`Kernel` knows its parameter types (a short signature such as ``"ptr ptr i32
f32"``), so an :class:`ArgPack` can build the ``void*[]`` argument array once and a hot
path only rewrites the fields that change before each ``cuLaunchKernel``.
"""

from __future__ import annotations

import ctypes
import os

from ..driver.calls import call, cu

CTYPES = {
    "ptr": ctypes.c_uint64,
    "i32": ctypes.c_int32,
    "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
}


def parse_signature(signature: str) -> list[type]:
    types = []
    for word in signature.split():
        if word not in CTYPES:
            raise ValueError(f"unknown kernel parameter type {word!r}: use {', '.join(CTYPES)}")
        types.append(CTYPES[word])
    return types


class ArgPack:
    """Kernel arguments laid out once as ctypes values plus a ``void*[]`` that points at them."""

    def __init__(self, types: list[type], values=()):
        self.values = [t() for t in types]
        self.array = (ctypes.c_void_p * max(1, len(types)))(
            *[ctypes.addressof(v) for v in self.values])
        self.address = ctypes.addressof(self.array)
        if values:
            self.set(*values)

    def set(self, *values) -> "ArgPack":
        if len(values) != len(self.values):
            raise ValueError(f"kernel takes {len(self.values)} arguments, got {len(values)}")
        for slot, v in zip(self.values, values):
            slot.value = _raw(v)
        return self

    def __setitem__(self, i: int, value) -> None:
        self.values[i].value = _raw(value)


def _raw(v):
    ptr = getattr(v, "ptr", None)  # tensors pass their device address
    return int(ptr) if ptr is not None else v


CARVEOUT_ENV = "NEXUSRT_SMEM_CARVEOUT"


def shared_carveout(env=None) -> int | None:
    """The shared-memory carveout every kernel asks for (percent of the unified L1/shared memory;
    ``NEXUSRT_SMEM_CARVEOUT``, default 100), None for the driver's own choice (``default``).

    Why one value for all: an SM runs blocks of two kernels side by side only while both use one
    L1/shared split. With the driver choosing per kernel, a kernel that needs a large split (the
    mma decode attention's 64-96 KiB rings) and the GEMVs beside it (a few KiB) get different
    splits, so with PDL the next kernel's blocks cannot start on an SM until it drains. H200,
    1B shape at 8k context, mma attention: 1.0036 ms/token with the driver's choice, 0.9581 with
    every kernel at 100 (BENCHMARKS.md). The persistent decode kernel, alone in its graph, takes
    the driver's choice instead (``ops/persistent.py``; :meth:`Kernel.set_carveout`)."""
    text = (os.environ if env is None else env).get(CARVEOUT_ENV, "100").strip().lower()
    if text == "default":
        return None
    if not text.isdigit() or int(text) > 100:
        raise ValueError(f"{CARVEOUT_ENV}={text!r}: give a percentage 0..100, or 'default' for the driver's choice")
    return int(text)


class Kernel:
    """One ``extern "C"`` kernel of a loaded library."""

    def __init__(self, library: "Library", name: str, signature: str):
        self.library, self.name = library, name
        self.types = parse_signature(signature)
        self.handle = call("cuLibraryGetKernel", library.handle, name.encode())
        self.function = call("cuKernelGetFunction", self.handle)
        self.max_dynamic_shared = 0  # the largest opt-in so far (the attribute never goes down)
        self.carveout = None  # what the kernel asks for (None: no preference, the driver's choice)
        self.set_carveout(shared_carveout())

    def pack(self, *values) -> ArgPack:
        return ArgPack(self.types, values)

    def set_carveout(self, percent: int | None) -> None:
        """Ask for ``percent`` of the unified L1/shared memory as shared memory, or (None) for no
        preference, the driver's choice (``CU_SHAREDMEM_CARVEOUT_DEFAULT``). A kernel asks for
        :func:`shared_carveout` when it is loaded; a launcher may ask for another. Asking for what
        the kernel already asks for makes no driver call."""
        if percent is not None and not 0 <= int(percent) <= 100:
            raise ValueError(f"carveout {percent!r}: give a percentage 0..100, or None for the driver's choice")
        percent = None if percent is None else int(percent)
        if percent == self.carveout:
            return
        attr = cu().CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
        call("cuFuncSetAttribute", self.function, attr, -1 if percent is None else percent)
        self.carveout = percent

    def static_shared(self) -> int:
        """The kernel's static shared memory in bytes (the driver's attribute)."""
        attr = cu().CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        return int(call("cuFuncGetAttribute", attr, self.function))

    def set_max_dynamic_shared(self, nbytes: int, device) -> None:
        """Opt in to ``nbytes`` of dynamic shared memory (more than 48 KiB needs it). The limit is
        the kernel's, not a launch's: it only ever rises, so building a launch that needs less
        (another program of the same kernel) never strands one built earlier that needs more."""
        if nbytes <= self.max_dynamic_shared:
            return
        attr = cu().CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        call("cuKernelSetAttribute", attr, int(nbytes), self.handle, device)
        self.max_dynamic_shared = int(nbytes)

    def launch(self, grid, block, args: "ArgPack | tuple", stream=None, shared: int = 0,
               pdl: bool = False) -> None:
        """Launch on ``stream`` (a Stream, a raw handle or None for the legacy stream).

        ``pdl=True`` allows programmatic dependent launch (sm_90+): the kernel may start
        before the previous one on the stream ends, so it must call ``nrt::pdl_wait()``
        (cu/pdl.cuh) before touching anything earlier kernels write.
        """
        if pdl:
            self.launch_ex(grid, block, args, stream, shared, pdl=True)
            return
        pack = args if isinstance(args, ArgPack) else self.pack(*args)
        gx, gy, gz = _dim3(grid)
        bx, by, bz = _dim3(block)
        call("cuLaunchKernel", self.function, gx, gy, gz, bx, by, bz, int(shared),
             _stream_handle(stream), pack.address, 0)

    def launch_cluster(self, grid, block, cluster, args: "ArgPack | tuple", stream=None,
                       shared: int = 0) -> None:
        """Launch with a thread-block cluster shape (sm_90+) through ``cuLaunchKernelEx``."""
        self.launch_ex(grid, block, args, stream, shared, cluster=cluster)

    def launch_ex(self, grid, block, args: "ArgPack | tuple", stream=None, shared: int = 0,
                  cluster=None, pdl: bool = False, cooperative: bool = False) -> None:
        """``cuLaunchKernelEx`` with launch attributes: a cluster shape, PDL, and/or a
        cooperative launch (every block resident at once, or the launch fails: what a kernel
        whose blocks wait for each other needs; it may be captured in a graph)."""
        pack = args if isinstance(args, ArgPack) else self.pack(*args)
        drv = cu()
        config = drv.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = _dim3(grid)
        config.blockDimX, config.blockDimY, config.blockDimZ = _dim3(block)
        config.sharedMemBytes = int(shared)
        config.hStream = _stream_handle(stream)
        attrs = []
        if cluster is not None:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            cx, cy, cz = _dim3(cluster)
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cx, cy, cz
            attrs.append(attr)
        if pdl:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            attrs.append(attr)
        if cooperative:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            attrs.append(attr)
        config.attrs = attrs
        config.numAttrs = len(attrs)
        call("cuLaunchKernelEx", config, self.function, pack.address, 0)


def _dim3(d) -> tuple[int, int, int]:
    if isinstance(d, int):
        return d, 1, 1
    d = tuple(int(x) for x in d)
    return (d + (1, 1, 1))[:3]


def _stream_handle(stream):
    if stream is None:
        return 0
    return getattr(stream, "handle", stream)


class Library:
    """A cubin loaded with ``cuLibraryLoadData``; kernels are looked up by name."""

    def __init__(self, cubin: bytes, name: str):
        self.name = name
        self.handle = call("cuLibraryLoadData", cubin, [], [], 0, [], [], 0)
        self._kernels: dict[str, Kernel] = {}

    def kernel(self, name: str, signature: str) -> Kernel:
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = Kernel(self, name, signature)
        return k

    def unload(self) -> None:
        if self.handle is not None:
            call("cuLibraryUnload", self.handle)
            self.handle = None
            self._kernels.clear()
