"""Kernel.set_max_dynamic_shared (nexusrt/kernels/launch.py): the kernel's dynamic shared-memory
limit only rises. The persistent kernel builds one launch per program (teacher-forced, greedy,
sampled); each set the limit to its own size, so a program built later with less would strand an
earlier, larger one (its launch refused). Driver calls recorded on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

from nexusrt.kernels import launch


def test_the_opt_in_only_rises(monkeypatch):
    calls = []

    def fake_call(name, *args):
        calls.append((name, *args))
        return f"{name}-handle"

    monkeypatch.setattr(launch, "call", fake_call)
    attr = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="MAXDYN")
    monkeypatch.setattr(launch, "cu", lambda: SimpleNamespace(CUfunction_attribute=attr))
    k = launch.Kernel(SimpleNamespace(handle="lib"), "k", "")
    del calls[:]
    for nbytes in (60_000, 50_000, 60_000, 70_000, 10_000):
        k.set_max_dynamic_shared(nbytes, "dev")
    assert calls == [("cuKernelSetAttribute", "MAXDYN", 60_000, k.handle, "dev"),
                     ("cuKernelSetAttribute", "MAXDYN", 70_000, k.handle, "dev")]
    assert k.max_dynamic_shared == 70_000
