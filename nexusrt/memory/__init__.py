"""The memory layer: the VMM arena, tensors, pinned host memory, copies, stats and the audit.

>>> import numpy as np, nexusrt as nrt
>>> nrt.firmware.init()
>>> with nrt.memory.alloc(shape=(4096, 4096), dtype="bf16", tag="weights") as w:
...     w.copy_from(np.ones((4096, 4096), np.float32), convert=True)
...     nrt.memory.stats()["by_tag"]
{'weights': 33554432}
>>> nrt.firmware.shutdown(); nrt.memory.audit()
[]

At boot the CUDA backend reserves one virtual range (default: the device memory) and
maps 2 MiB physical pages into it on demand; freed pages stay in a pool. The CPU
backend runs the same bookkeeping over host memory.
"""

from __future__ import annotations

from .api import (alloc, audit, empty, from_numpy, pinned, reset_peak, set_high_water, stats,
                  trim, zeros)
from .copy import copy, copy_async
from .core import DoubleFree, UseAfterFree
from .dtypes import DTYPES, DType
from .tensor import Tensor

__all__ = ["alloc", "empty", "zeros", "from_numpy", "pinned", "copy", "copy_async", "stats",
           "audit", "trim", "set_high_water", "reset_peak", "Tensor", "DTYPES", "DType",
           "DoubleFree", "UseAfterFree"]
