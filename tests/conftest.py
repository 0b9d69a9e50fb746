"""Shared fixtures. GPU tests carry ``@pytest.mark.gpu`` and skip where no GPU answers."""

from __future__ import annotations

import os

import pytest

from nexusrt.driver.detect import probe_driver

_GPU_OK, _GPU_REASON, _ = probe_driver() if os.environ.get("NEXUSRT_BACKEND") != "cpu" else (False, "NEXUSRT_BACKEND=cpu", 0)


def pytest_collection_modifyitems(config, items):
    if _GPU_OK:
        return
    skip = pytest.mark.skip(reason=f"no GPU: {_GPU_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler for the test, so ``_thread.interrupt_main()`` raises
    KeyboardInterrupt even where pytest was started with SIGINT ignored (a background job of a
    non-interactive shell), in which case the interpreter keeps the ignore and the press is lost."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def no_work(monkeypatch):
    """nexusrt-bench must refuse before it works: loading a model or timing a generation (the decode
    stage's, one device or tensor-parallel) fails the test."""
    from nexusrt.bench import decode, decode_tp
    from nexusrt.engine import llm

    def refuse(*_a, **_k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(llm, "LLM", refuse)
    monkeypatch.setattr(decode, "time_generation", refuse)
    monkeypatch.setattr(decode_tp, "time_generation", refuse)


@pytest.fixture
def cpu_rt():
    """A runtime on the CPU backend, shut down (and audited by its users) afterwards."""
    import nexusrt as nrt

    nrt.firmware.shutdown()
    nrt.firmware.init(backend="cpu")
    yield nrt.firmware.runtime()
    nrt.firmware.shutdown()


@pytest.fixture
def gpu_rt():
    """A runtime on the CUDA backend (use with ``@pytest.mark.gpu``)."""
    import nexusrt as nrt

    nrt.firmware.shutdown()
    nrt.firmware.init(backend="cuda")
    yield nrt.firmware.runtime()
    nrt.firmware.shutdown()


@pytest.fixture
def tiny_llm(cpu_rt):
    """``nexusrt:stdlib-tiny`` on the CPU (context 512, batch 4), closed afterwards."""
    import nexusrt as nrt

    llm = nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", max_context=512, max_batch=4)
    yield llm
    llm.close()


def engine_is_empty(llm) -> bool:
    """The leak audit: every KV block of ``llm``'s serving engine in one place, none held."""
    blocks = llm.engine.engine.blocks
    blocks.audit()
    return blocks.num_used == 0
