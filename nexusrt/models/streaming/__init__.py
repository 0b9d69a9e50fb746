"""Streaming weight loading: safetensors bytes from disk into arena tensors at storage speed.

>>> from nexusrt.models.streaming import LoadItem, load_tensors
>>> report = load_tensors(rt, [LoadItem(info, dst) for info, dst in pairs])
>>> report.path, report.why, report.gb_per_s

``load_tensors`` reads with cuFile when the CUDA backend booted and through pinned
staging buffers otherwise (see :mod:`.loader`); ``save_synthetic_checkpoint`` writes a
synthetic preset as a checkpoint directory to load from (see :mod:`.savefile`).
"""

from .loader import FileStats, LoadReport, load_tensors
from .plan import Chunk, LoadItem, Piece, check_items, plan_chunks
from .progress import ProgressBar
from .savefile import save_synthetic_checkpoint
from .staging import StagingConfig
from .writer import SafetensorsWriter

__all__ = ["LoadItem", "LoadReport", "FileStats", "load_tensors", "StagingConfig", "ProgressBar",
           "save_synthetic_checkpoint", "SafetensorsWriter", "Chunk", "Piece", "check_items", "plan_chunks"]
