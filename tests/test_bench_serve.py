"""``nexusrt-bench --stage serve`` on the CPU: complete figures, prefix hits with a shared prompt,
preemptions under a small KV pool, exactly the requested tokens, bad arguments refused."""

from __future__ import annotations

import json

import pytest

from nexusrt.bench.main import main
from nexusrt.bench.serve import workload


def bench(capsys, *extra):
    rc = main(["--stage", "serve", "--backend", "cpu", "--no-peers", "--json", "--runs", "1",
               "--prompt-tokens", "24", "--new-tokens", "6", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_levels_report_every_figure(capsys):
    r = bench(capsys, "--concurrency", "1,4")
    assert r["model"] == "nexusrt:stdlib-tiny" and "CPU figure" in r["note"]
    assert r["prefill_path"] is None  # the CPU runner has one prompt path
    assert list(r["levels"]) == ["1", "4"]
    for n, lv in r["levels"].items():
        assert lv["output_tokens"] == int(n) * 6
        assert 0 < lv["ttft_p50_s"] <= lv["ttft_p99_s"] and 0 < lv["tpot_p50_s"] <= lv["tpot_p99_s"]
        assert 0 < lv["kv_blocks_peak"] <= lv["kv_blocks_total"] and lv["preemptions"] == 0
        assert lv["output_tokens_per_s"] > 0


def test_a_shared_prefix_is_computed_once(capsys):
    lv = bench(capsys, "--concurrency", "6", "--shared-prefix", "64")["levels"]["6"]
    # 64 shared tokens = 4 blocks; every request after the first finds them (the budget admits
    # the later ones after the first one's prompt is computed)
    assert lv["prefix_hit_blocks"] >= 4 * 4
    assert lv["computed_tokens"] < lv["prompt_tokens"] + 6 * 6


def test_a_small_pool_preempts_and_still_finishes(capsys):
    lv = bench(capsys, "--concurrency", "8", "--kv-memory", str(10 * 65536))["levels"]["8"]
    assert lv["kv_blocks_total"] == 10 and lv["preemptions"] > 0 and lv["output_tokens"] == 8 * 6


def test_workload_is_deterministic_and_spread():
    a, b = workload(16, 100, 5, 10, 4096), workload(16, 100, 5, 10, 4096)
    assert a == b
    lengths = [len(p) - 10 for p, _ in a]
    assert min(lengths) >= 75 and max(lengths) <= 125 and len(set(lengths)) > 8
    assert all(p[:10] == a[0][0][:10] for p, _ in a)


def test_sampling_runs_seeded_and_batch_invariant_on_the_cpu(capsys):
    r = bench(capsys, "--concurrency", "1,3", "--temperature", "0.9")
    assert r["temperature"] == 0.9
    assert [lv["output_tokens"] for lv in r["levels"].values()] == [6, 18]
    assert r["levels"]["3"]["same_ids_as_alone"]  # request 0 keeps seed 0 alone and among others


@pytest.mark.parametrize("bad", [["--concurrency", "0"], ["--runs", "0"], ["--shared-prefix", "-1"],
                                 ["--temperature", "-0.5"]])
def test_bad_arguments_are_refused(bad, capsys):
    assert main(["--stage", "serve", "--backend", "cpu", "--no-peers", *bad]) == 1
    assert "must be >= " in capsys.readouterr().err


def test_a_concurrency_past_the_bound_is_refused_before_any_work(capsys, monkeypatch):
    import time

    from nexusrt.bench import serve

    monkeypatch.setattr(serve, "request_sizes", lambda *a: pytest.fail("the workload was sized"))
    t0 = time.perf_counter()
    assert main(["--stage", "serve", "--backend", "cpu", "--no-peers", "--concurrency", "1,100000000"]) == 1
    assert f"--concurrency values must be at most {serve.MAX_CONCURRENCY}, got 100000000" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30


def test_the_prefill_path_option_reaches_the_cuda_runner(monkeypatch):
    """``--prefill-path`` picks CudaBatchRunner's ``ragged_prefill`` (constructed by a stand-in here)."""
    import argparse

    from nexusrt.backends.cuda import batch
    from nexusrt.bench import serve

    from types import SimpleNamespace

    made = []
    monkeypatch.setattr(batch, "CudaBatchRunner", lambda *a, **kw: made.append((a, kw)) or kw)
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=8)
    unit = 2 * 2 * 16 * 8 * 2  # one block's bf16 K and V in both layers
    llm = SimpleNamespace(runner=SimpleNamespace(max_context=64), config=cfg)
    for path, ragged in (("ragged", True), ("per-sequence", False)):
        serve._batch_runner(llm, False, 10, None, 4, 2048, False, path)
        (args, kw) = made[-1]
        assert kw["ragged_prefill"] is ragged and kw["max_chunk"] == 2048
        assert args[1] == 10 and kw["host_blocks"] == 0
    with pytest.raises(ValueError, match="--prefill-path"):
        serve._batch_runner(llm, False, 10, None, 4, 2048, False, "both")
    # --kv-gpu-budget: the pool capped at 6 blocks, the rest of 4 x 64 tokens (16 blocks) on the host tier.
    serve._batch_runner(llm, False, 10, None, 4, 2048, False, "ragged", kv_gpu_budget=6 * unit)
    assert made[-1][0][1] == 6 and made[-1][1]["host_blocks"] == 10
    with pytest.raises(ValueError, match="CUDA backend"):
        serve._batch_runner(llm, True, 10, None, 4, 2048, False, None, kv_gpu_budget=6 * unit)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert parser.parse_args([]).prefill_path == "ragged"
    assert parser.parse_args(["--prefill-path", "per-sequence"]).prefill_path == "per-sequence"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-path", "both"])
