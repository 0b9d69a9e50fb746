"""The tensor-parallel split (ShardPlan), the shard view and the in-process communicator (CPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from nexusrt.errors import ModelError
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.parallel import LocalGroup, ShardPlan, shard
from nexusrt.models.presets import preset

from helpers_hf import build_checkpoint


@pytest.fixture(scope="module")
def weights():
    # tiny: 4 q heads, 2 KV heads, head_dim 64, intermediate 512, vocab 512
    return SyntheticWeights.from_preset("tiny", seed=3)


def test_local_config_has_the_rank_share_of_heads_and_width(weights):
    local = ShardPlan(weights.config, 2).local_config(1)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (2, 1, 256)
    assert local.vocab_size == weights.config.vocab_size and local.hidden_size == weights.config.hidden_size
    assert not local.tie_word_embeddings and "rank 1 of tensor_parallel=2" in local.source


@pytest.mark.parametrize("n", [1, 2])
def test_shards_reassemble_every_tensor(weights, n):
    """Concatenating the ranks' parts along the split axis gives the whole tensor back, for
    every tensor; replicated ones are equal on every rank."""
    plan = ShardPlan(weights.config, n)
    views = [shard(weights, plan, r) for r in range(n)]
    for spec in weights.specs() + [weights.spec("lm_head")]:
        whole = weights.load(spec.name)
        parts = [v.load(spec.name) for v in views]
        split = plan.split(spec.name, 0)
        if split is None:
            assert all(np.array_equal(p, whole) for p in parts), spec.name
        else:
            assert np.array_equal(np.concatenate(parts, axis=split.axis), whole), spec.name


def test_fused_qkv_of_a_shard_is_its_heads_of_q_then_k_then_v(weights):
    cfg, d = weights.config, weights.config.head_dim
    view = shard(weights, ShardPlan(cfg, 2), 1)
    qkv = view.fused(0, "qkv")
    q, k, v = (weights.load(f"layers.0.{t}") for t in "qkv")
    # rank 1 of 2: query heads 2..3, KV head 1 (the one heads 2 and 3 share under GQA)
    expect = np.concatenate([q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert np.array_equal(qkv, expect)
    gate_up = view.fused(0, "gate_up")
    assert np.array_equal(gate_up[:256], weights.load("layers.0.gate")[256:])
    assert np.array_equal(gate_up[256:], weights.load("layers.0.up")[256:])
    assert np.array_equal(view.load("layers.0.down"), weights.load("layers.0.down")[:, 256:])


@pytest.mark.parametrize("field, value, other", [("num_attention_heads", 3, {"num_key_value_heads": 1}),
                                                 ("num_key_value_heads", 3, {"num_attention_heads": 6}),
                                                 ("vocab_size", 511, {}), ("intermediate_size", 511, {})])
def test_indivisible_shapes_name_the_field_and_the_degree(field, value, other):
    cfg = replace(preset("tiny"), **{field: value}, **other)
    with pytest.raises(ModelError, match=rf"{field} \({value}\) is not divisible by tensor_parallel=2"):
        ShardPlan(cfg, 2)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_degree_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1"):
        ShardPlan(preset("tiny"), n)


def test_rank_out_of_range(weights):
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        shard(weights, ShardPlan(weights.config, 2), 2)


def test_checkpoint_shards_read_through_the_map_equal_the_whole(tmp_path):
    """bf16 and fp32 safetensors: the mmap'd row and column slices equal slices of a full read."""
    from nexusrt.models.loader import load_model

    for dtype in ("float32", "bfloat16"):
        path = build_checkpoint(tmp_path / dtype, arch="qwen2", heads=8, kv_heads=4, tie=True,
                                dtype=dtype)
        w = load_model(str(path)).weights
        plan = ShardPlan(w.config, 4)
        for name in ("layers.1.q_bias", "layers.1.v", "layers.0.o", "layers.0.down", "lm_head"):
            parts = [shard(w, plan, r).load(name) for r in range(4)]
            axis = plan.split(name, 0).axis
            assert np.array_equal(np.concatenate(parts, axis=axis), w.load(name)), (dtype, name)


def test_all_reduce_sums_in_rank_order_and_is_read_only():
    g = LocalGroup(3)
    parts = [np.array([1e8], np.float32), np.array([1.0], np.float32), np.array([-1e8], np.float32)]
    total = g.all_reduce(parts)
    assert total[0] == np.float32(0.0)  # (1e8 + 1) rounds to 1e8 in fp32 first: rank order, not pairwise
    assert g.all_reduce(parts[::-1])[0] == np.float32(0.0)
    assert g.all_reduce([parts[0], parts[2], parts[1]])[0] == np.float32(1.0)
    assert not total.flags.writeable and parts[0][0] == np.float32(1e8)  # inputs untouched


def test_collectives_check_their_buffers():
    g = LocalGroup(2)
    with pytest.raises(ValueError, match="2 ranks got 1 buffers"):
        g.all_reduce([np.zeros(3)])
    with pytest.raises(ValueError, match="differ in shape"):
        g.all_reduce([np.zeros(3), np.zeros(4)])
    got = g.all_gather([np.ones((2, 3)), np.zeros((2, 1))], axis=-1)
    assert got.shape == (2, 4) and np.array_equal(got[:, :3], np.ones((2, 3)))


def test_a_worker_whose_front_is_gone_ends_quietly(monkeypatch):
    """A killed front leaves a broken pipe: the worker's answer fails to send. It used to end with
    a BrokenPipeError traceback on the terminal; now it releases what it booted and returns."""
    import threading
    from multiprocessing import Pipe

    from nexusrt.parallel import worker_side
    from nexusrt.parallel.worker_side import serve_requests

    monkeypatch.setattr(worker_side.signal, "signal", lambda *args: None)  # a worker's main, on a thread here
    for gone_before in ("ready", "answer"):
        front, worker = Pipe()
        released, errors = [], []
        boot = lambda: ((lambda message: "an answer"), lambda: released.append(1), {"pid": 0})  # noqa: E731

        def run():
            try:
                serve_requests(worker, boot)
            except BaseException as exc:  # noqa: BLE001 (what the test looks for)
                errors.append(exc)

        if gone_before == "ready":
            front.close()
        thread = threading.Thread(target=run)
        thread.start()
        if gone_before == "answer":
            assert front.recv() == ("ok", {"pid": 0})
            front.send(("step", 1))
            front.close()  # before the answer comes back
        thread.join(timeout=10)
        worker.close()
        assert not thread.is_alive() and errors == [] and released == [1], (gone_before, errors)
