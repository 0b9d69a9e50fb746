"""Launchers: one module per kernel source in ``cu/``.

Each launcher checks its shape preconditions and returns a :class:`LaunchSpec`, which the
caller launches directly or hands to a scheduler stage. A module may also define
``bench_cases(rt, config) -> list[BenchCase]`` for ``nexusrt-bench --stage kernels``.
"""

from .spec import BenchCase, LaunchSpec

__all__ = ["LaunchSpec", "BenchCase"]
