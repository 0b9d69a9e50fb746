"""Firmware layer: backend choice, profiles, boot phases, errors, kernels, streams, doorbells."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import CompileError, NotInitialized, ProfileMismatch
from nexusrt.driver import detect, profile
from nexusrt.driver.calls import call


# ---------------------------------------------------------------- CPU: always run
def test_boot_cpu_runs_every_phase_and_shutdown_is_idempotent(cpu_rt):
    assert cpu_rt.backend == "cpu"
    assert list(cpu_rt.boot_s) == list(nrt.firmware.PHASES)
    assert all(t >= 0 for t in cpu_rt.boot_s.values())
    assert nrt.firmware.init() is cpu_rt.device  # a second init returns the running device
    nrt.firmware.shutdown()
    nrt.firmware.shutdown()
    with pytest.raises(NotInitialized, match=r"nrt\.firmware\.init\(\)"):
        nrt.firmware.runtime()


def test_api_before_init_says_to_call_init():
    nrt.firmware.shutdown()
    with pytest.raises(NotInitialized, match="call nrt.firmware.init"):
        nrt.firmware.doorbell()


def test_unknown_profile_lists_valid_names():
    nrt.firmware.shutdown()
    with pytest.raises(ValueError) as info:
        nrt.firmware.init(profile="h900", backend="cpu")
    for name in ("auto", "a100", "h100", "h200", "l4", "t4", "p100", "cpu"):
        assert name in str(info.value)
    assert not nrt.runtime.is_initialized()


def test_named_profile_that_contradicts_device_names_fields():
    measured = profile.HardwareProfile(name="auto", backend="cuda", device_name="NVIDIA A100-SXM4-80GB",
                                       compute_capability=(8, 0), sm_count=108, memory_bytes=80 * 2**30)
    with pytest.raises(ProfileMismatch) as info:
        profile.resolve("h100", measured)
    text = str(info.value)
    assert "compute_capability" in text and "sm_count" in text and "memory" not in text


def test_auto_profile_identifies_known_cards_and_fills_datasheet_figures():
    h100 = profile.HardwareProfile(name="auto", backend="cuda", device_name="NVIDIA H100 80GB HBM3",
                                   compute_capability=(9, 0), sm_count=132, memory_bytes=81559 * 2**20)
    assert profile.resolve("auto", h100).name == "h100"
    assert h100.peak_bf16_flops > 0
    assert h100.arch == "sm_90a"
    h200 = profile.HardwareProfile(name="auto", backend="cuda", compute_capability=(9, 0), sm_count=132,
                                   memory_bytes=143771 * 2**20)
    assert profile.resolve("auto", h200).name == "h200"
    odd = profile.HardwareProfile(name="auto", backend="cuda", compute_capability=(8, 6), sm_count=84,
                                  memory_bytes=24 * 2**30)
    assert profile.resolve("auto", odd).name == "custom"
    assert odd.arch == "sm_86"


def test_every_shipped_profile_is_valid_json_with_peaks():
    for name in profile.profile_names():
        data = profile.load_named(name)
        assert data["name"] == name
        if data["backend"] == "cuda":
            assert data["peak_bandwidth_bytes_s"] > 1e11 and len(data["compute_capability"]) == 2


def test_backend_env_forcing(monkeypatch):
    monkeypatch.setenv("NEXUSRT_BACKEND", "cpu")
    assert detect.choose_backend().backend == "cpu"
    monkeypatch.setenv("NEXUSRT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="tpu"):
        detect.choose_backend()


def test_forcing_cuda_without_driver_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(detect, "probe_driver", lambda: (False, "no CUDA driver: test", 0))
    monkeypatch.setenv("NEXUSRT_BACKEND", "cuda")
    with pytest.raises(nrt.BackendUnavailable, match="no CUDA driver"):
        detect.choose_backend()


def test_bench_detect_json_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "nexusrt.bench.main", "--stage", "detect", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("backend", "profile", "device", "features", "boot_s"):
        assert key in data
    for key in ("name", "compute_capability", "sm_count", "memory_bytes", "peak_bandwidth_bytes_s"):
        assert key in data["device"]
    assert set(data["boot_s"]) == set(nrt.firmware.PHASES)


def test_bench_bad_profile_exits_nonzero_without_traceback():
    out = subprocess.run([sys.executable, "-m", "nexusrt.bench.main", "--profile", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "valid profiles" in out.stderr


def test_compile_error_names_file_options_and_log():
    from nexusrt.kernels.compiler import compile_source

    with pytest.raises(CompileError) as info:
        compile_source('extern "C" __global__ void k() { int x = ; }', "broken.cu", "sm_90a", use_cache=False)
    text = str(info.value)
    assert "broken.cu" in text and "--gpu-architecture=sm_90a" in text and "expected an expression" in text


def test_kernel_cache_hits_on_second_compile(tmp_path, monkeypatch):
    from nexusrt.kernels.compiler import compile_file

    monkeypatch.setenv("NEXUSRT_CACHE_DIR", str(tmp_path))
    first = compile_file("selftest", "sm_90a")
    second = compile_file("selftest", "sm_90a")
    other = compile_file("selftest", "sm_80")
    assert not first.cached and second.cached and not other.cached
    assert first.cubin == second.cubin and first.cubin != other.cubin
    assert len(list(tmp_path.glob("*.cubin"))) == 2


def test_unknown_kernel_signature_type_is_rejected():
    from nexusrt.kernels.launch import parse_signature

    with pytest.raises(ValueError, match="f16"):
        parse_signature("ptr f16")


# ---------------------------------------------------------------- GPU: lent machine
def _dev_alloc(nbytes):
    return int(call("cuMemAlloc", nbytes))


@pytest.mark.gpu
def test_gpu_boot_profile_auto_matches_the_card(gpu_rt):
    p = gpu_rt.profile
    assert gpu_rt.backend == "cuda"
    assert p.compute_capability >= (7, 5) and p.sm_count > 0 and p.memory_bytes > 2**30
    assert p.peak_bandwidth_bytes_s > 1e11
    if "H100" in p.device_name:
        assert p.name == "h100" and p.arch == "sm_90a"
    assert list(gpu_rt.boot_s) == list(nrt.firmware.PHASES)


@pytest.mark.gpu
def test_gpu_named_profile_mismatch(gpu_rt):
    wrong = "t4" if gpu_rt.profile.name != "t4" else "h100"
    nrt.firmware.shutdown()
    with pytest.raises(ProfileMismatch):
        nrt.firmware.init(profile=wrong, backend="cuda")


@pytest.mark.gpu
def test_gpu_compiled_kernel_computes_saxpy(gpu_rt):
    rng = np.random.default_rng(7)
    n = 10_007
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    dx, dy = _dev_alloc(4 * n), _dev_alloc(4 * n)
    try:
        call("cuMemcpyHtoD", dx, x.ctypes.data, 4 * n)
        call("cuMemcpyHtoD", dy, y.ctypes.data, 4 * n)
        k = gpu_rt.kernels.get("selftest", "saxpy", "ptr ptr f32 i32")
        k.launch((n + 255) // 256, 256, (dy, dx, 1.5, n), gpu_rt.streams["compute"])
        gpu_rt.streams["compute"].synchronize()
        out = np.empty(n, np.float32)
        call("cuMemcpyDtoH", out.ctypes.data, dy, 4 * n)
    finally:
        call("cuMemFree", dx)
        call("cuMemFree", dy)
    np.testing.assert_allclose(out, 1.5 * x + y, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_cluster_launch_forms_clusters(gpu_rt):
    if not gpu_rt.profile.features.get("clusters"):
        pytest.skip("device has no thread-block clusters")
    blocks = 8
    d = _dev_alloc(4 * blocks)
    try:
        k = gpu_rt.kernels.get("selftest", "cluster_rank", "ptr")
        k.launch_cluster(blocks, 32, 2, (d,), gpu_rt.streams["compute"])
        gpu_rt.streams["compute"].synchronize()
        out = np.empty(blocks, np.int32)
        call("cuMemcpyDtoH", out.ctypes.data, d, 4 * blocks)
    finally:
        call("cuMemFree", d)
    assert out.tolist() == [2000 + (i % 2) for i in range(blocks)]


@pytest.mark.gpu
def test_gpu_doorbell_gates_a_stream_until_rung(gpu_rt):
    """A kernel queued behind a doorbell must not run before the ring, and must run after it."""
    n = 1024
    stream = gpu_rt.streams["compute"]
    x = np.ones(n, np.float32) * 2
    dx, dy = _dev_alloc(4 * n), _dev_alloc(4 * n)
    try:
        call("cuMemcpyHtoD", dx, x.ctypes.data, 4 * n)
        call("cuMemsetD32", dy, 0, n)
        # Fetch the kernel first: loading code while a stream is gated would have to wait for it.
        k = gpu_rt.kernels.get("selftest", "saxpy", "ptr ptr f32 i32")
        bell = nrt.firmware.doorbell("test")
        bell.wait_on(stream)  # waits for the next ring
        k.launch((n + 255) // 256, 256, (dy, dx, 1.0, n), stream)
        done = nrt.firmware.event(timing=False).record(stream)
        import time

        time.sleep(0.2)
        assert not done.query(), "the gated kernel ran before the doorbell rang"
        out = np.empty(n, np.float32)
        call("cuMemcpyDtoH", out.ctypes.data, dy, 4 * n)  # legacy stream: does not wait for the gated stream
        assert not out.any()
        bell.ring()
        done.synchronize()
        call("cuMemcpyDtoH", out.ctypes.data, dy, 4 * n)
        assert (out == 2).all()
    finally:
        stream.synchronize()
        call("cuMemFree", dx)
        call("cuMemFree", dy)


@pytest.mark.gpu
def test_gpu_doorbell_rung_by_another_stream(gpu_rt):
    bell = nrt.firmware.doorbell("stream-to-stream")
    waiter, ringer = gpu_rt.streams["compute"], gpu_rt.streams["control"]
    target = bell.wait_on(waiter)
    done = nrt.firmware.event(timing=False).record(waiter)
    assert not done.query()
    bell.ring(stream=ringer)
    done.synchronize()
    assert bell.value == target
    bell.host_wait(target, timeout_ms=1000)


@pytest.mark.gpu
def test_gpu_stream_priorities_span_the_device_range(gpu_rt):
    least, greatest = gpu_rt.streams.priority_range
    prios = {s.role: s.priority for s in gpu_rt.streams.streams.values()}
    assert prios["compute_high"] == greatest and prios["compute"] == least
    if least != greatest:
        assert prios["compute_high"] < prios["compute"]


def test_compiling_leaves_python_constants_alone():
    """NVRTC once wrote an empty log's NUL into CPython's shared one-byte b" " object,
    corrupting every b" " in the process (safetensors headers came out padded with NULs)."""
    from nexusrt.kernels.compiler import compile_source

    compile_source('extern "C" __global__ void k() {}', "tiny.cu", "sm_90a", use_cache=False)
    assert bytes([32]) == b" " and b" " * 3 == b"   " and b"a b".split() == [b"a", b"b"]
