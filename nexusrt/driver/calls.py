"""The one choke point for CUDA driver and NVRTC calls.

Every call returns ``(err, *outs)`` in ``cuda.bindings``; :func:`call` turns that into the
outputs or a :class:`~nexusrt.errors.CudaError` naming the call and the driver's error.
The bindings are imported lazily so that a machine without them (or without a driver)
can still import NexusRT and run the CPU backend.
"""

from __future__ import annotations

from typing import Any

from ..errors import CompileError, CudaError

_cu = None
_nvrtc = None


def cu():
    """The ``cuda.bindings.driver`` module (imported on first use)."""
    global _cu
    if _cu is None:
        from cuda.bindings import driver as module

        _cu = module
    return _cu


def nvrtc():
    """The ``cuda.bindings.nvrtc`` module (imported on first use)."""
    global _nvrtc
    if _nvrtc is None:
        from cuda.bindings import nvrtc as module

        _nvrtc = module
    return _nvrtc


def _unpack(outs: tuple) -> Any:
    if not outs:
        return None
    if len(outs) == 1:
        return outs[0]
    return outs


def check(result: tuple, call_name: str) -> Any:
    """Check a driver result tuple; return its outputs (None, one value, or a tuple)."""
    err, *outs = result
    if int(err) != 0:
        raise _driver_error(call_name, err)
    return _unpack(tuple(outs))


def call(name: str, *args) -> Any:
    """Call ``cuda.bindings.driver.<name>(*args)`` and check the result."""
    return check(getattr(cu(), name)(*args), name)


def _driver_error(call_name: str, err) -> CudaError:
    code = int(err)
    name, text = f"CUresult {code}", "unknown error"
    try:
        e, s = cu().cuGetErrorName(err)
        if int(e) == 0 and s:
            name = s.decode() if isinstance(s, bytes) else str(s)
        e, s = cu().cuGetErrorString(err)
        if int(e) == 0 and s:
            text = s.decode() if isinstance(s, bytes) else str(s)
    except Exception:  # the names are a courtesy; the code is the fact
        pass
    return CudaError(call_name, code, name, text)


def nvrtc_call(name: str, *args) -> Any:
    """Call ``cuda.bindings.nvrtc.<name>(*args)`` and check the result (not for compile)."""
    result = getattr(nvrtc(), name)(*args)
    err, *outs = result
    if int(err) != 0:
        _, text = nvrtc().nvrtcGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise CudaError(name, int(err), f"NVRTC_ERROR {int(err)}", text)
    return _unpack(tuple(outs))


def out_buffer(size: int) -> bytearray:
    """A writable buffer for an NVRTC call to fill.

    Never ``b" " * size``: for size 1 (an empty log is just its NUL) CPython hands back its
    shared one-byte ``b" "`` object, and NVRTC writing into it turned every ``b" "`` in the
    process into ``b"\\0"`` (found when safetensors headers came out padded with NULs).
    """
    return bytearray(max(0, int(size)))


def nvrtc_compile(program, options: list[str], source_name: str) -> None:
    """Compile an NVRTC program; on failure raise CompileError with the log."""
    opts = [o.encode() for o in options]
    (err,) = nvrtc().nvrtcCompileProgram(program, len(opts), opts)
    if int(err) != 0:
        size = nvrtc_call("nvrtcGetProgramLogSize", program)
        log = out_buffer(size)
        nvrtc_call("nvrtcGetProgramLog", program, log)
        raise CompileError(source_name, options, bytes(log).decode(errors="replace").rstrip("\x00"))
