"""The decode benchmark on the CPU: it runs, labels itself a CPU figure, and rejects bad names."""

from __future__ import annotations

import json

import pytest

from nexusrt.bench.decode import bytes_per_token
from nexusrt.bench.main import main
from nexusrt.models.presets import preset


def test_cpu_run_is_labelled_and_complete(capsys):
    rc = main(["--stage", "decode", "--backend", "cpu", "--new-tokens", "6", "--prompt-tokens", "5",
               "--runs", "2", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    assert r["backend"] == "cpu" and r["model"] == "nexusrt:stdlib-tiny" and "CPU figure" in r["note"]
    assert len(r["ms_per_token_runs"]) == 2 and r["ms_per_token"] > 0 and r["ttft_s"] > 0
    assert "floor_ms" not in r  # no floor without a measured device bandwidth


def test_sampled_decode_is_timed_and_labelled(capsys):
    rc = main(["--stage", "decode", "--backend", "cpu", "--new-tokens", "4", "--prompt-tokens", "5", "--runs", "1",
               "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "sampled: temperature 0.7, top-k 20, top-p 0.9, seed 0" in out.out
    assert main(["--stage", "decode", "--backend", "cpu", "--temperature", "0.7", "--top-p", "1.5"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_unknown_synthetic_name_lists_the_presets(capsys):
    assert main(["--stage", "decode", "--backend", "cpu", "--model", "synthetic:llama-9b"]) == 1
    err = capsys.readouterr().err
    assert "llama-9b" in err and "llama-3.2-1b" in err and "Traceback" not in err


@pytest.mark.parametrize("bad, least", [(["--runs", "0"], 1), (["--new-tokens", "-1"], 2), (["--new-tokens", "1"], 2)])
def test_bad_counts_are_rejected(bad, least, capsys):
    assert main(["--stage", "decode", "--backend", "cpu", *bad]) == 1
    assert f"{bad[0]} must be >= {least}" in capsys.readouterr().err


def test_bytes_per_token_matches_the_published_model_sizes():
    # Llama-3.2-1B: 1.236e9 parameters (tied) -> 2.47 GB of bf16 per token (BENCHMARKS.md: 2.475 GB/token).
    b = bytes_per_token(preset("llama-3.2-1b"), context=0)
    assert abs(b["weights"] / 1e9 - 2.47) < 0.01 and b["kv"] == 0
    b8 = bytes_per_token(preset("llama-3.1-8b"), context=1000)
    # 8.03e9 parameters (16.06 GB), less the untied input embedding, of which one row is read:
    assert abs(b8["weights"] / 1e9 - 15.01) < 0.01  # BENCHMARKS.md: 15.02 GB/token
    assert b8["kv"] == 2 * 32 * 8 * 128 * 2 * 1000


def test_a_model_asked_for_by_name_runs_on_the_cpu(capsys, tmp_path):
    pytest.importorskip("transformers")
    from helpers_hf import checkpoint

    path = str(checkpoint("qwen3"))
    rc = main(["--stage", "decode", "--backend", "cpu", "--model", path, "--new-tokens", "3", "--prompt-tokens", "4",
               "--runs", "1", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == path and r["note"] == ""


def test_tables_print_no_raw_dicts():
    from nexusrt.bench.decode import render
    from nexusrt.bench.table import plain

    assert plain({"skipped": "torch has no CUDA here", "n": [1, 2.5]}) == "skipped: torch has no CUDA here; n: 1, 2.50"
    r = {"model": "m", "device": "d", "backend": "cpu", "profile": "cpu", "prompt_tokens": 1, "new_tokens": 1,
         "runs": 1, "ms_per_token": 1.0, "ms_per_token_runs": [1.0], "tokens_per_s": 1e3, "ttft_s": 0.1,
         "bytes_per_token": {"total": 1}, "achieved_bytes_s": 1.0, "peers": {"eager": {"skipped": "no torch"}}}
    text = render(r)
    assert "PyTorch eager  skipped: no torch" in text and "{" not in text


@pytest.mark.parametrize("value", ["", "graph,graph", "graf", "graph,megakernel"])
def test_bad_decode_paths_are_rejected(value, capsys):
    assert main(["--stage", "decode", "--backend", "cpu", "--decode-paths", value]) == 1
    err = capsys.readouterr().err
    assert "--decode-paths" in err and "graph, persistent" in err and "Traceback" not in err


def test_other_paths_are_reported_beside_the_headline():
    from nexusrt.bench.decode import _path_figures, render

    other = _path_figures({"runs": [{"ms_per_token": 1.2}, {"ms_per_token": 1.4}, {"ms_per_token": 1.3}]}, 0.65)
    assert other["ms_per_token"] == 1.3 and abs(other["fraction_of_floor"] - 0.5) < 1e-12
    skipped = {"skipped": "the persistent decode kernel needs an sm_90 GPU; this one is sm_80"}
    assert _path_figures(skipped, 0.65) is skipped
    r = {"model": "m", "device": "d", "backend": "cuda", "profile": "p", "prompt_tokens": 32, "new_tokens": 8,
         "runs": 3, "ms_per_token": 0.8, "ms_per_token_runs": [0.8] * 3, "tokens_per_s": 1250.0, "ttft_s": 0.001,
         "bytes_per_token": {"total": 2e9}, "achieved_bytes_s": 2.5e12, "read_bandwidth_bytes_s": 4e12,
         "floor_ms": 0.65, "fraction_of_floor": 0.8125, "decode_path": "graph", "other_paths": {"persistent": other}}
    lines = [" ".join(line.split()) for line in render(r).splitlines()]  # columns' padding aside
    assert "ms / token (graph) 0.8000 (runs: 0.800, 0.800, 0.800)" in lines
    assert "persistent path 1.3000 ms/token (50.0% of the floor; 1.62x the graph path)" in lines
    r["other_paths"] = {"persistent": skipped}
    lines = [" ".join(line.split()) for line in render(r).splitlines()]
    assert "persistent path not run: the persistent decode kernel needs an sm_90 GPU; this one is sm_80" in lines


def test_env_set_restores_each_variable_even_after_an_error(monkeypatch):
    import os

    from nexusrt.bench.common import env_set

    monkeypatch.setenv("NEXUSRT_DECODE", "graph")
    monkeypatch.delenv("NEXUSRT_PERSISTENT_PROFILE", raising=False)
    with pytest.raises(RuntimeError):
        with env_set(NEXUSRT_DECODE="persistent", NEXUSRT_PERSISTENT_PROFILE="1"):
            assert os.environ["NEXUSRT_DECODE"] == "persistent" and os.environ["NEXUSRT_PERSISTENT_PROFILE"] == "1"
            raise RuntimeError("a runner failed to build")
    assert os.environ["NEXUSRT_DECODE"] == "graph" and "NEXUSRT_PERSISTENT_PROFILE" not in os.environ


def test_versus_greedy_pairs_every_sampled_run_with_a_greedy_one(capsys):
    rc = main(["--stage", "decode", "--backend", "cpu", "--new-tokens", "4", "--prompt-tokens", "5", "--runs", "3",
               "--temperature", "0.7", "--top-p", "0.9", "--versus-greedy", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    v = r["versus_greedy"]
    assert len(v["delta_us_runs"]) == len(v["greedy_ms_per_token_runs"]) == 3
    for d, ms, g in zip(v["delta_us_runs"], r["ms_per_token_runs"], v["greedy_ms_per_token_runs"]):
        assert d == pytest.approx((ms - g) * 1e3)
    assert v["delta_us"] == sorted(v["delta_us_runs"])[1] and min(v["greedy_ms_per_token_runs"]) > 0


@pytest.mark.parametrize("extra, match", [([], "give --temperature > 0"),
                                          (["--temperature", "0.7", "--tensor-parallel", "2"], "one device")])
def test_versus_greedy_needs_sampling_and_one_device(extra, match, capsys):
    assert main(["--stage", "decode", "--backend", "cpu", "--versus-greedy", *extra]) == 1
    err = capsys.readouterr().err
    assert "--versus-greedy" in err and match in err and "Traceback" not in err


def test_versus_greedy_alternates_the_order_on_one_model(monkeypatch):
    """Each pair runs on the same LLM, the asked pick first on even runs and greedy first on odd
    ones (the warm-up is run 0), so neither side always runs on a warmer machine."""
    import argparse

    from nexusrt.bench import decode_timing
    from nexusrt.engine import llm as llm_module
    from nexusrt.reference.sampling import SamplingParams

    built, calls = [], []

    class FakeLLM:
        def __init__(self, model, **kwargs):
            built.append(model)
            self.config, self.runner = "cfg", object()

        def close(self):
            pass

    def fake_generate(llm, prompt, new_tokens, params, label):
        calls.append("greedy" if params.greedy else "sampled")
        return 0.01, 2.0 if params.greedy else 2.5

    monkeypatch.setattr(llm_module, "LLM", FakeLLM)
    monkeypatch.setattr(decode_timing, "_generate", fake_generate)
    args = argparse.Namespace(prompt_tokens=5, new_tokens=4, runs=2,
                              sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=0))
    _, runs, _, _ = decode_timing.time_generation("m", [1, 2], args, "x", versus_greedy=True)
    assert built == ["m"]
    assert calls == ["sampled", "greedy", "greedy", "sampled", "sampled", "greedy"]
    assert runs == [{"ttft_s": 0.01, "ms_per_token": 2.5, "greedy_ms_per_token": 2.0}] * 2
