"""``nrt.LLM(..., tensor_parallel=N)``: the CPU runs the sharded decoder in both paths (one
sequence and the serving engine), CUDA takes the degree (its workers: tests/test_cuda_tp_cpu.py),
and the command line passes the flag through."""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.cpu.sharded import ShardedDecoder
from nexusrt.cli.main import build_parser
from nexusrt.engine.runners import check_tensor_parallel
from nexusrt.errors import ModelError

from conftest import engine_is_empty

PROMPTS = ["The quick brown fox", "Once upon a time, a small model", "Weights are read from"]


@pytest.fixture
def pair(cpu_rt):
    """stdlib-tiny (a trained model: its greedy text is not a coin toss) at TP=1 and TP=2."""
    llms = [nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", max_context=256, max_batch=4, tensor_parallel=n)
            for n in (1, 2)]
    yield llms
    for llm in llms:
        llm.close()


def test_tp2_llm_generates_tp1s_greedy_ids_alone_and_batched(pair):
    one, two = pair
    assert isinstance(two.runner.decoder, ShardedDecoder) and two.runner.decoder.size == 2
    assert not isinstance(one.runner.decoder, ShardedDecoder) and two.tensor_parallel == 2
    alone = [two.generate(p, max_new_tokens=24, temperature=0).token_ids for p in PROMPTS]
    assert alone == [one.generate(p, max_new_tokens=24, temperature=0).token_ids for p in PROMPTS]
    batched = two.generate(PROMPTS, max_new_tokens=24, temperature=0)  # the serving engine's path
    assert [r.token_ids for r in batched] == alone
    assert engine_is_empty(two)


def test_indivisible_kv_heads_fail_before_the_runner(cpu_rt):
    with pytest.raises(ModelError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel=4"):
        nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", tensor_parallel=4)


@pytest.mark.parametrize("n", [0, -2, 1.0, True])
def test_bad_degree(cpu_rt, n):
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1"):
        nrt.LLM("synthetic:tiny", backend="cpu", tensor_parallel=n)


def test_cuda_takes_tensor_parallel_degrees():
    """CUDA's refusals (GPUs, nccl4py, shapes) are the ProcessRunner's: tests/test_cuda_tp_cpu.py."""
    check_tensor_parallel(2, "cuda")
    check_tensor_parallel(1, "cuda")


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "x"], ["chat"]])
def test_cli_flag(command):
    parser = build_parser()
    assert parser.parse_args(command + ["--tensor-parallel", "2"]).tensor_parallel == 2
    assert parser.parse_args(command).tensor_parallel == 1
    assert parser.parse_args(command + ["--tensor-parallel", "2", "--tp-processes"]).tp_processes
    assert not parser.parse_args(command).tp_processes


def test_a_worker_opens_the_resolved_weights_without_hashing_again(monkeypatch):
    """What a tensor-parallel worker gets is the front's resolved directory (or preset and seed):
    opening it looks up no name and checks no manifest, and gives the same tensors."""
    from nexusrt.models import loader, shipped
    from nexusrt.models.loader import WeightsOrigin, load_model

    model = load_model("nexusrt:stdlib-tiny")
    synthetic = load_model("synthetic:tiny", seed=3)
    try:
        assert model.origin == WeightsOrigin(str(model.path), 0, ())
        assert synthetic.origin == WeightsOrigin("synthetic:tiny", 3, ())

        def refuse(*_a, **_k):
            raise AssertionError("the worker resolved or hashed again")

        for mod, name in ((shipped, "verify_manifest"), (loader, "verify_manifest"), (loader, "locate")):
            monkeypatch.setattr(mod, name, refuse)
        for m in (model, synthetic):
            again = m.origin.open()
            try:
                assert np.array_equal(again.load("embed"), m.weights.load("embed"))
            finally:
                again.close()
    finally:
        model.weights.close()
        synthetic.weights.close()
