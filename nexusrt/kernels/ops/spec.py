"""What a launcher returns, and what a micro-benchmark case is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..launch import ArgPack, Kernel


@dataclass
class LaunchSpec:
    """One kernel launch, fully described: kernel, shape, dynamic shared memory, packed args."""

    kernel: Kernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: ArgPack
    shared: int = 0
    name: str = ""
    pdl: bool = False  # programmatic dependent launch: only for kernels that call nrt::pdl_wait()
    cooperative: bool = False  # all blocks co-resident (the persistent kernel's blocks wait on each other)
    cluster: tuple[int, int, int] | None = None  # thread-block cluster dims (sm_90), None: no clusters

    def launch(self, stream=None) -> None:
        if self.cooperative:
            self.kernel.launch_ex(self.grid, self.block, self.args, stream, self.shared, cooperative=True)
            return
        if self.cluster is not None:
            self.kernel.launch_ex(self.grid, self.block, self.args, stream, self.shared, cluster=self.cluster,
                                  pdl=self.pdl)
            return
        self.kernel.launch(self.grid, self.block, self.args, stream, self.shared, pdl=self.pdl)


@dataclass
class BenchCase:
    """A kernel timed alone: ``launch(stream)`` runs it once on inputs already filled with
    random data; ``bytes_moved`` is the fewest bytes it must move through device memory."""

    name: str
    bytes_moved: int
    launch: Callable[[object], None]
    group: str = ""  # e.g. "gemv", "attention", "norm"
    notes: dict = field(default_factory=dict)
