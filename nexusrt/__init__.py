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

from . import errors, firmware, memory, scheduler
from .errors import (BackendUnavailable, CompileError, CudaError, ModelError, NexusRTError,
                     NotInitialized, OutOfMemory, ProfileMismatch, SchedulerError)

__version__ = "0.1.0"


def __getattr__(name):
    # The model stack pulls in tokenizers and jinja2; load it only when asked for.
    if name == "LLM":
        from .engine.llm import LLM

        return LLM
    if name == "Context":
        from .engine.context import Context

        return Context
    raise AttributeError(f"module 'nexusrt' has no attribute {name!r}")


__all__ = ["firmware", "memory", "scheduler", "errors", "LLM", "Context", "NexusRTError", "NotInitialized",
           "BackendUnavailable", "CudaError", "CompileError", "OutOfMemory", "ProfileMismatch",
           "ModelError", "SchedulerError", "__version__"]
