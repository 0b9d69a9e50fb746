"""The KV cache's one home: tokens per KV block, the block pool, per-sequence block tables,
the pools' shape and the checks the kernels' launchers share.

Plain logic, no device: the CUDA runner allocates the pools (``backends/cuda/buffers.py``)
and uploads a :class:`~nexusrt.kvcache.blocks.SequenceBlocks` table; the kernels read it.
It sits below the kernels (they import :mod:`nexusrt.kvcache.checks`) and above memory.
"""
