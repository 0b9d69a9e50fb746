"""NexusRT: an LLM inference runtime that owns the GPU through the CUDA Driver API.

>>> import nexusrt as nrt
>>> dev = nrt.firmware.init(profile="auto")
>>> buf = nrt.memory.alloc(shape=(4096, 4096), dtype="bf16", ilc=True)
>>> stage = nrt.scheduler.stage(name="infer.transformer_block_0", inputs=[buf], outputs=[],
...                             token_budget=4096, sm_footprint_mb=64)
>>> nrt.scheduler.submit(stage)
>>> nrt.scheduler.wait_barrier()
"""

from __future__ import annotations

import importlib

from . import errors
from .errors import (BackendUnavailable, CompileError, CudaError, ModelError, NexusRTError,
                     NotInitialized, OutOfMemory, ProfileMismatch, SchedulerError)

__version__ = "0.1.0"


_LAYERS = ("firmware", "memory", "scheduler")


def __getattr__(name):
    # Each loads on first use, not at `import nexusrt`: the runtime layers pull in NumPy and
    # ml_dtypes (~0.6 s), the model stack tokenizers and jinja2. The commands import this package
    # before their Ctrl-C handler is in place; a press in that second printed a traceback.
    if name in _LAYERS:
        return importlib.import_module(f".{name}", __name__)
    if name == "LLM":
        from .engine.llm import LLM

        return LLM
    if name == "Context":
        from .engine.context import Context

        return Context
    raise AttributeError(f"module 'nexusrt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["firmware", "memory", "scheduler", "errors", "LLM", "Context", "NexusRTError", "NotInitialized",
           "BackendUnavailable", "CudaError", "CompileError", "OutOfMemory", "ProfileMismatch",
           "ModelError", "SchedulerError", "__version__"]
