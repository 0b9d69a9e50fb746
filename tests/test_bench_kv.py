"""``nexusrt-bench --stage kv`` (quality half, CPU): the teacher-forced pruned decode equals the
unpruned forward when nothing is evicted, and the stage reports every policy and budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.cpu.batch import CpuBatchRunner
from nexusrt.bench import kv as kv_bench
from nexusrt.bench.main import main
from nexusrt.serving.pruning import KvPolicy


def test_pruned_decode_equals_the_forward_until_it_evicts(cpu_rt):
    llm = nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", max_context=64)
    try:
        ids = np.asarray(llm.tokenizer.encode("import os\nimport sys\n\ndef main(argv):\n    return 0\n" * 3),
                         np.int32)[:48]
        runner = CpuBatchRunner(llm.runner.decoder, 4, 64)
        full = kv_bench.pruned_logits(runner, ids, KvPolicy())
        assert np.array_equal(full, llm.runner.forward_all(ids))  # the decoder is batch invariant: exact
        wide = kv_bench.pruned_logits(runner, ids, KvPolicy("h2o", budget=48))
        assert np.array_equal(wide, full)
        tight = kv_bench.pruned_logits(runner, ids, KvPolicy("sink-window", budget=20))
        assert np.array_equal(tight[:20], full[:20])  # the first budget tokens see the whole cache
        assert not np.array_equal(tight[20:], full[20:])
    finally:
        llm.close()


def test_the_stage_reports_every_policy_and_budget(capsys):
    assert main(["--stage", "kv", "--backend", "cpu", "--json", "--kv-window", "64", "--tokens", "128"]) == 0
    r = json.loads(capsys.readouterr().out)
    got = [(q["policy"], q["budget"]) for q in r["quality"]]
    assert got == [("full", None), ("sink-window", 16), ("sink-window", 32), ("h2o", 16), ("h2o", 32)]
    full = r["quality"][0]
    assert full["top1_agreement"] == 1.0 and full["over_full"] == 1.0 and full["tokens"] == 126
    for q in r["quality"][1:]:
        assert 0 < q["top1_agreement"] <= 1 and q["perplexity"] > 1
    assert set(r["target_50pct_within_5pct"]) == {"sink-window", "h2o"}
    assert "needs the CUDA backend" in r["speed"]["skipped"]  # the speed half: tests/test_bench_kv_speed.py


def test_bad_stage_arguments(capsys):
    assert main(["--stage", "kv", "--kv-window", "4"]) == 1
    assert "--kv-window must be >= 8" in capsys.readouterr().err
    assert main(["--stage", "kv", "--kv-window", "many"]) == 1  # a usage error: one line, status 1
    assert "argument --kv-window: invalid int value: 'many'" in capsys.readouterr().err
