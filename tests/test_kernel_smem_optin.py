"""Kernel.set_max_dynamic_shared (nexusrt/kernels/launch.py): the kernel's dynamic shared-memory
limit only rises; and every kernel asks for one shared-memory carveout (NEXUSRT_SMEM_CARVEOUT). The persistent kernel builds one launch per program (teacher-forced, greedy,
sampled); each set the limit to its own size, so a program built later with less would strand an
earlier, larger one (its launch refused). Driver calls recorded on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nexusrt.kernels import launch

ATTRS = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="MAXDYN",
                        CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT="CARVEOUT")


def _record(monkeypatch):
    calls = []

    def fake_call(name, *args):
        calls.append((name, *args))
        return f"{name}-handle"

    monkeypatch.setattr(launch, "call", fake_call)
    monkeypatch.setattr(launch, "cu", lambda: SimpleNamespace(CUfunction_attribute=ATTRS))
    return calls


def test_the_opt_in_only_rises(monkeypatch):
    calls = _record(monkeypatch)
    k = launch.Kernel(SimpleNamespace(handle="lib"), "k", "")
    del calls[:]
    for nbytes in (60_000, 50_000, 60_000, 70_000, 10_000):
        k.set_max_dynamic_shared(nbytes, "dev")
    assert calls == [("cuKernelSetAttribute", "MAXDYN", 60_000, k.handle, "dev"),
                     ("cuKernelSetAttribute", "MAXDYN", 70_000, k.handle, "dev")]
    assert k.max_dynamic_shared == 70_000


@pytest.mark.parametrize("value, want", [(None, 100), ("100", 100), ("0", 0), (" 50 ", 50), ("default", None)])
def test_every_kernel_asks_for_the_carveout(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(launch.CARVEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.CARVEOUT_ENV, value)
    calls = _record(monkeypatch)
    launch.Kernel(SimpleNamespace(handle="lib"), "k", "")
    asked = [c for c in calls if c[0] == "cuFuncSetAttribute"]
    assert asked == ([] if want is None else [("cuFuncSetAttribute", "cuKernelGetFunction-handle", "CARVEOUT", want)])


@pytest.mark.parametrize("value", ["101", "-1", "half", "1e2"])
def test_a_bad_carveout_is_refused_by_name(value):
    with pytest.raises(ValueError, match="NEXUSRT_SMEM_CARVEOUT"):
        launch.shared_carveout({launch.CARVEOUT_ENV: value})


@pytest.mark.parametrize("percent, want", [(None, -1), (0, 0), (100, None)])
def test_a_kernel_can_take_its_own_carveout(monkeypatch, percent, want):
    monkeypatch.delenv(launch.CARVEOUT_ENV, raising=False)  # loaded asking for 100
    calls = _record(monkeypatch)
    k = launch.Kernel(SimpleNamespace(handle="lib"), "k", "")
    del calls[:]
    for _ in range(2):  # asked twice: one driver call, none for what the kernel asks for already
        k.set_carveout(percent)
    assert calls == ([] if want is None else [("cuFuncSetAttribute", "cuKernelGetFunction-handle", "CARVEOUT", want)])
    assert k.carveout == percent
    for bad in (-1, 101):
        with pytest.raises(ValueError, match="carveout"):
            k.set_carveout(bad)
