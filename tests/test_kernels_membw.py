"""The bandwidth probe and the kernels benchmark stage built on it.

CPU: the stage's helpers (case discovery, graph sizing, rows, rendering, the --model
option shared with the decode stage) and its clean refusal without a GPU.
GPU: the probe returns a sane figure and really reads the buffer; the stage runs end to end.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from nexusrt.bench import common, kernels
from nexusrt.kernels.ops import bench_util, membw
from nexusrt.kernels.ops.spec import BenchCase


def test_expected_sum_wraps_mod_2_32():
    assert membw.expected_sum(16, 1) == 4
    assert membw.expected_sum(1 << 30, 0xFFFFFFFF) == ((1 << 28) * 0xFFFFFFFF) % 2**32


def test_model_argument_registers_once_and_defaults():
    parser = argparse.ArgumentParser()
    common.add_model_argument(parser)
    common.add_model_argument(parser)  # the decode stage calls it too: no argparse conflict
    kernels.add_arguments(parser)
    args = parser.parse_args([])
    assert args.model == "synthetic:llama-3.2-1b" and args.kernel_repeats == 30
    assert parser.parse_args(["--model", "synthetic:llama-3.1-8b"]).model == "synthetic:llama-3.1-8b"


def test_bench_main_parser_builds_with_every_stage():
    from nexusrt.bench.main import build_parser

    args = build_parser().parse_args(["--stage", "kernels", "--kernel-filter", "gemv"])
    assert args.kernel_filter == "gemv" and args.model == common.MODEL_DEFAULT


def test_resolve_model_config():
    cfg = common.resolve_model_config("synthetic:llama-3.1-8b")
    assert (cfg.hidden_size, cfg.intermediate_size) == (4096, 14336)
    assert common.resolve_model_config("llama-3.2-1b").hidden_size == 2048
    with pytest.raises(ValueError, match="neither synthetic"):
        common.resolve_model_config("no-such-model-anywhere")


def test_case_factories_find_every_ops_module_with_bench_cases():
    names = [name for name, _ in kernels.case_factories()]
    assert {"gemv", "gemm", "elementwise"} <= set(names)
    assert "spec" not in names and "common" not in names


def test_launches_per_graph_is_a_multiple_of_copies():
    assert kernels.launches_per_graph(1) == 20
    assert kernels.launches_per_graph(13) == 26
    assert kernels.launches_per_graph(64) == 64


def test_copies_needed_spans_the_l2():
    l2 = 50 * 2**20
    assert bench_util.copies_needed(8 * 2**20, l2) == 25  # 1B o_proj: 8 MiB x 25 = 4 L2s
    assert bench_util.copies_needed(2**30, l2) == 1
    assert bench_util.copies_needed(1, l2) == bench_util.MAX_COPIES
    with pytest.raises(ValueError):
        bench_util.copies_needed(0, l2)


def test_rotate_cycles_through_specs():
    seen = []
    specs = [SimpleNamespace(launch=lambda s, i=i: seen.append((i, s))) for i in range(3)]
    launch = bench_util.rotate(specs)
    for _ in range(5):
        launch("stream")
    assert [i for i, _ in seen] == [0, 1, 2, 0, 1] and launch.copies == 3
    with pytest.raises(ValueError):
        bench_util.rotate([])


def test_summarise_and_render():
    case = BenchCase("gemv o 2048x2048", 8_400_000, lambda s: None, group="gemv",
                     notes={"splits": 1, "_keep": object(), "flops": 2 * 2048 * 2048})
    row = kernels.summarise(case, {"us": 3.0, "us_min": 2.9}, bandwidth=3.0e12)
    assert row["gb_s"] == pytest.approx(2800.0)
    assert row["pct_bw"] == pytest.approx(100 * 2.8e12 / 3.0e12)
    assert "_keep" not in row["notes"]
    text = kernels.render({"backend": "cuda", "device": "H100", "arch": "sm_90a", "model": "m",
                           "read_bandwidth_bytes_s": 3.0e12, "peak_bandwidth_bytes_s": 3.35e12,
                           "repeats": 20, "cases": [row], "errors": ["x: boom"]})
    assert text.splitlines()[-1].startswith("gemv") and "93.3%" in text and "ERROR x: boom" in text


def test_stage_refuses_cleanly_on_cpu(capsys):
    from nexusrt.bench.main import main

    rc = main(["--stage", "kernels", "--backend", "cpu"])
    assert rc == 0
    assert "needs the CUDA backend" in capsys.readouterr().out


@pytest.mark.gpu
def test_probe_is_sane_and_really_reads(gpu_rt):
    bw = membw.measure_read_bandwidth(gpu_rt, nbytes=1 << 30, repeats=20)
    peak = gpu_rt.profile.peak_bandwidth_bytes_s
    assert 1e11 < bw
    if peak:
        assert bw < 1.02 * peak  # above the datasheet: the probe is not reading what it claims


@pytest.mark.gpu
def test_probe_kernel_sums_every_word(gpu_rt):
    import numpy as np

    import nexusrt as nrt

    n = (1 << 20) + 48  # not a multiple of the unrolled stride: the tail loop must count too
    data = np.random.default_rng(0).integers(0, 2**32, size=n // 4, dtype=np.uint64).astype(np.uint32)
    buf = nrt.memory.from_numpy(data.view(np.int32))
    partial = nrt.memory.from_numpy(np.full(7, -1, np.int32))
    membw.read_probe(gpu_rt, partial, buf, n, 7).launch(gpu_rt.streams["compute"])
    got = int(partial.to_numpy().view(np.uint32).astype(np.uint64).sum()) % 2**32
    assert got == int(data.astype(np.uint64).sum()) % 2**32


@pytest.mark.gpu
def test_kernels_stage_end_to_end(capsys):
    from nexusrt.bench.main import main

    rc = main(["--stage", "kernels", "--backend", "cuda", "--kernel-repeats", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ERROR" not in out, out
    assert "gemv lm_head" in out and "% BW" in out
    # The persistent kernel's phases beside the graph kernels (sm_90), or why it did not run.
    assert "persistent decode step per phase" in out or "persistent decode step: not run:" in out, out
