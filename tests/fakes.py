"""Fakes for the kernel launcher tests on the CPU: a runtime, its kernels and tensors.

A launcher only reads ``rt.kernels.get(source, name, signature)``, the profile's SM count,
the device handle and its arguments' ``ptr``/``shape``/``dtype``, so these stand in for a
booted GPU: the tests check the shape preconditions, the kernel picked and the grid.
"""

from __future__ import annotations

from types import SimpleNamespace


def tensor(shape, dtype: str, ptr: int = 0x1000) -> SimpleNamespace:
    """A device tensor as a launcher sees it (``shape`` None: a raw address with a dtype)."""
    return SimpleNamespace(shape=None if shape is None else tuple(shape), dtype=dtype, ptr=ptr)


class FakeKernel:
    """A compiled kernel: ``pack`` returns the values, dynamic shared memory is recorded."""

    function = None

    def __init__(self, name: str = ""):
        self.name, self.shared, self.carveout = name, None, "as loaded"
        self.static = 20 * 1024  # static shared memory, as a kernel's attribute says

    def pack(self, *values):
        return values

    def set_max_dynamic_shared(self, nbytes, device):
        self.shared = nbytes

    def set_carveout(self, percent):
        self.carveout = percent

    def static_shared(self):
        return self.static


class FakeRuntime:
    """A runtime whose kernel cache records what was asked: ``(source, name, signature)``.

    ``kernel``, when given, is returned for every request (to inspect what the launcher did
    to it); otherwise each request gets a new :class:`FakeKernel` named after the kernel.
    """

    def __init__(self, kernel: FakeKernel | None = None, sm_count: int = 132):
        self.asked: list[tuple[str, str, str]] = []
        self.kernel = kernel
        self.kernels = SimpleNamespace(get=self._get)
        self.profile = SimpleNamespace(sm_count=sm_count)
        self.device = SimpleNamespace(handle=0)

    def _get(self, source, name, signature):
        self.asked.append((source, name, signature))
        return self.kernel if self.kernel is not None else FakeKernel(name)
