"""The request engine: sequences, KV block management with prefix caching, continuous batching.

Plain logic above the backends (``Engine`` drives a :class:`~nexusrt.backends.base.BatchRunner`)
and below ``engine/`` (``nrt.LLM``) and the HTTP server; no driver import. The stage
scheduler of the CUDA runtime is ``nrt.scheduler``; this package's ``Scheduler`` decides which
sequences run in a step.
"""

from .block_manager import BlockManager
from .engine import Engine
from .loop import EngineLoop, EngineStopped, QueueFull
from .pruning import POLICIES, KvPolicy
from .scheduler import Scheduler, SchedulerConfig, Work
from .sequence import Sequence, State

__all__ = ["BlockManager", "Engine", "EngineLoop", "EngineStopped", "KvPolicy", "POLICIES", "QueueFull", "Scheduler",
           "SchedulerConfig", "Sequence", "State", "Work"]
