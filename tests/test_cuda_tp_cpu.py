"""The CUDA tensor-parallel rank, checked on the CPU (issue 17).

- A rank's stage chains (decode, LM head, prefill) over its shard's local shape, built through
  the real launchers with the fake kernel cache: an all-reduce stage right after every O and
  down product, in place on the residual rows, the residual added on rank 0 only, the LM head
  writing the rank's vocab slice of the logits row and an in-place all-gather after it; the
  collectives reach NcclGroup (nccl4py's recording stand-in) with the right pointers and counts.
- The shard upload: the rows a checkpoint streams (narrowed safetensors entries) and the columns
  it reads through the map, and the device copies a synthetic shard makes, equal the CPU shard view.
- The worker protocol: the real CUDA rank loop in spawned processes over a fake runner (device
  ordinal = rank, one unique id for all, NVLS off, the shard's local shape), the same ids as
  the runner alone, a killed worker named with nothing left behind.
- The collective timing (``nexusrt-bench --tensor-parallel``'s all-reduce line): a decode step's
  all-reduces and all-gather alone, in place on zeroed scratch, on the rank's stream, after a
  warm-up step and a barrier; through the worker message, every rank answers.
- The refusals, before any process starts: more ranks than GPUs, indivisible shapes, a rank's
  shape the kernels cannot run, nccl4py missing; the host KV tier.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import multiprocessing
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import nccl_fakes
from cuda_tp_fakes import STREAM_BASE, FakeRankRunner, FakeRankTarget, logits_table
from nexusrt import memory
from nexusrt.backends.base import generate_tokens
from nexusrt.backends.cuda import shard_upload
from nexusrt.backends.cuda import step as steps
from nexusrt.backends.cuda.buffers import RunnerBuffers
from nexusrt.backends.cuda.collectives import RankComm, time_step_collectives
from nexusrt.backends.cuda.tp_front import ProcessRunner
from nexusrt.backends.cuda.weights import _layout
from nexusrt.errors import BackendUnavailable, ModelError
from nexusrt.kernels.ops import gemm as gm
from nexusrt.kernels.ops import gemv as gv
from nexusrt.models.loader import WeightsOrigin, load_model
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.parallel import ShardPlan, shard
from nexusrt.parallel import nccl as nccl_mod
from nexusrt.parallel.procs import WorkerDied
from nexusrt.reference.sampling import SamplingParams
from nexusrt.scheduler.graph import TaskGraph
from tests.fakes import FakeRuntime
from tests.test_cuda_step_cpu import VARIANTS, _config, _FakeLt, no_occupancy_query  # noqa: F401
from tp_worker_fakes import gone

copy_mod = importlib.import_module("nexusrt.memory.copy")  # the module (the package exports its copy())


@pytest.fixture
def recorded_nccl(monkeypatch):
    calls: list = []
    for name, m in nccl_fakes.modules(calls).items():
        monkeypatch.setitem(sys.modules, name, m)
    return calls


@pytest.fixture
def epilogues(monkeypatch):
    """Every GEMV/GEMM the chains ask for: (weight pointer, y pointer, residual pointer or None)."""
    seen = []
    for mod, name in ((gv, "gemv"), (gm, "gemm")):
        real = getattr(mod, name)

        def record(rt, y, w, x, *, _real=real, **kw):
            seen.append((w.ptr, y.ptr, None if kw.get("residual") is None else kw["residual"].ptr))
            return _real(rt, y, w, x, **kw)

        monkeypatch.setattr(mod, name, record)
    return seen


def _rank_setup(cfg, rank: int, size: int):
    """A rank's shard laid out as the runner's weights, its buffers and its RankComm over NcclGroup."""
    part = shard(SyntheticWeights(cfg), ShardPlan(cfg, size), rank)
    weights, _ = _layout(part)
    weights.inv_freq = memory.empty((cfg.head_dim // 2,), "fp32")
    weights.owned.append(weights.inv_freq)
    buffers = RunnerBuffers(FakeRuntime(), part.config, 300, 64, positions=363, lm_head_rows=cfg.vocab_size // size)
    group = nccl_mod.NcclGroup(rank, size, bytes(128))
    return part.config, weights, buffers, RankComm(group, cfg.vocab_size)


def _same(a, b) -> bool:
    return a.ptr == b.ptr and tuple(a.shape) == tuple(b.shape)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_chains_put_the_collectives_where_the_plan_needs_them(variant, rank, cpu_rt, no_occupancy_query,
                                                                   recorded_nccl, epilogues):
    cfg, size = _config(variant), 2
    local, weights, b, tp = _rank_setup(cfg, rank, size)
    rt, lt = FakeRuntime(), _FakeLt()
    try:
        assert local.num_attention_heads == cfg.num_attention_heads // size
        assert weights.lm_head.shape == (cfg.vocab_size // size, cfg.hidden_size)
        decode = steps.decode_stages(rt, local, weights, b, sample=True, tp=tp)
        chains = {"decode": decode, "logits": steps.logits_stages(rt, local, weights, b, tp),
                  "prefill64": steps.prefill_stages(rt, local, weights, b, 64, lt, tp=tp)}
        vl = cfg.vocab_size // size
        with memory.empty((17, vl), "fp32") as mine, memory.empty((size * 17 * vl,), "fp32") as gathered:
            chains["all_logits"] = steps.prefill_stages(rt, local, weights, b, 17, lt, all_logits=mine, tp=tp,
                                                        gathered=gathered)
            for name, stages in chains.items():
                TaskGraph(stages, name).validate()
            head, gather = chains["all_logits"][-2:]
            assert gather.name.endswith("lm_head.all_gather") and gather.inputs == [mine]
            assert gather.outputs == [gathered]
        layers = cfg.num_hidden_layers
        assert len(decode) == 1 + 8 * layers + 2 + 3  # embed, 6 + 2 all-reduces per layer, head + gather, sampler
        assert len(chains["prefill64"]) == 1 + 11 * layers
        by_name = {s.name: i for i, s in enumerate(decode)}
        x = b.hidden[0:1]
        for i in range(layers):
            for product in ("o", "down"):
                at = by_name[f"decode.layer{i}.{product}"]
                reduce = decode[at + 1]
                assert reduce.name == f"decode.layer{i}.{product}.all_reduce" and reduce.kind == "host"
                assert _same(reduce.inputs[0], x) and _same(reduce.outputs[0], x) and len(reduce.inputs) == 1
        head, gather, part, _, finish = decode[-5:]
        mine = head.outputs[0]
        assert head.name == "decode.lm_head" and mine.shape == (1, vl)
        assert mine.ptr == b.logits.ptr + rank * vl * 4  # the rank's slice of the one logits row
        assert gather.name == "decode.lm_head.all_gather" and gather.inputs == [mine] and gather.outputs == [b.logits]
        assert part.name == "sample.partial" and b.logits in finish.inputs  # every rank samples the gathered row

        # the residual: added by rank 0's O and down products only (decode GEMVs and prefill GEMMs)
        h = cfg.hidden_size
        products = {lw.o.ptr for lw in weights.layers} | {lw.down.ptr for lw in weights.layers}
        row_parallel = [(y, res) for w, y, res in epilogues if w in products]
        assert len(row_parallel) == 2 * layers * 3  # decode, prefill64 and all_logits (the logits chain has none)
        assert all(res == (y if rank == 0 else None) for y, res in row_parallel)

        # the collectives, run as capture runs them (given the stream): NCCL's in-place forms
        stream = SimpleNamespace(handle=nccl_fakes.StreamHandle(99))
        del recorded_nccl[:]
        decode[by_name["decode.layer0.o.all_reduce"]].kernel(stream=stream)
        gather.kernel(stream=stream)
        f32 = int(nccl_fakes.DataType.Float32)
        assert recorded_nccl == [("all_reduce", x.ptr, x.ptr, h, f32, 0, "comm", 99),
                                 ("all_gather", b.logits.ptr + rank * vl * 4, b.logits.ptr, vl, f32, "comm", 99)]
    finally:
        b.free()
        weights.free()
    assert memory.stats()["in_use_bytes"] == 0


def test_warm_up_runs_each_collective_once_outside_capture(cpu_rt, recorded_nccl):
    cfg = _config("llama_tiny")
    _, weights, b, tp = _rank_setup(cfg, 1, 2)
    synced = []
    try:
        tp.warm_up([b.hidden[0:1], b.hidden], b.logits, SimpleNamespace(handle=5, synchronize=lambda: synced.append(1)))
        kinds = [(c[0], c[3]) for c in recorded_nccl if c[0] != "init"]
        assert kinds == [("all_reduce", cfg.hidden_size), ("all_reduce", 64 * cfg.hidden_size),
                         ("all_gather", cfg.vocab_size // 2)] and synced == [1]
    finally:
        b.free()
        weights.free()


def _step_calls(calls, rank: int, h: int, vl: int, stream: int) -> list:
    """``calls`` (recorded NCCL tuples) as (kind, count) after checking each is NCCL's in-place
    form over the timing's own scratch: one row reduced, the logits row gathered into itself."""
    rows = {c[1] for c in calls if c[0] == "all_reduce"}
    assert len(rows) == 1  # every all-reduce on the one scratch row
    out = []
    for c in calls:
        if c[0] == "all_reduce":
            assert c[1] == c[2] and c[3] == h and c[-1] == stream
        else:
            assert c[0] == "all_gather" and c[1] == c[2] + rank * vl * 4 and c[3] == vl and c[-1] == stream
        out.append((c[0], c[3]))
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_step_collectives_are_timed_alone_on_scratch(cpu_rt, recorded_nccl, rank):
    cfg = _config("llama_tiny")
    _, weights, b, tp = _rank_setup(cfg, rank, 2)
    stream = SimpleNamespace(role="compute", handle=nccl_fakes.StreamHandle(77), synchronize=lambda: None)
    try:
        before = memory.stats()["in_use_bytes"]
        del recorded_nccl[:]
        got = time_step_collectives(tp, cpu_rt, cfg, stream, 3)
        assert memory.stats()["in_use_bytes"] == before  # the scratch is freed
        with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
            time_step_collectives(tp, cpu_rt, cfg, stream, 0)
    finally:
        b.free()
        weights.free()
    h, vl, layers = cfg.hidden_size, cfg.vocab_size // 2, cfg.num_hidden_layers
    step = [("all_reduce", h)] * (2 * layers) + [("all_gather", vl)]
    # a warm-up step, the barrier, three timed steps; the refused call ran none
    assert _step_calls(recorded_nccl, rank, h, vl, 77) == step + [("all_reduce", h)] + step * 3
    assert got["rank"] == rank and got["all_reduces"] == 2 * layers and got["all_gathers"] == 1
    assert len(got["step_s"]) == 3 and all(t > 0 for t in got["step_s"]) and "host clock" in got["clock"]


def test_the_timed_collectives_form_a_valid_chain_for_capture(cpu_rt, recorded_nccl):
    """On CUDA the timing captures its collectives as the decode graph does: a chain of host
    stages on the rank's stream (the CPU scheduler validates the same plan it would capture)."""
    from nexusrt.backends.cuda import collectives

    cfg = _config("llama_tiny")
    _, weights, b, tp = _rank_setup(cfg, 0, 2)
    x, logits = b.hidden[0:1], b.logits
    try:
        ops = [("all_reduce", tp.all_reduce(x), x, x)] * 4 + [("all_gather", tp.all_gather(tp.vocab_slice(logits),
                                                                                          logits), logits, logits)]
        graph = collectives._capture(ops, SimpleNamespace(role="compute"))
        try:
            assert list(graph.stages) == [f"tp_timing.{i}.all_reduce" for i in range(4)] + ["tp_timing.4.all_gather"]
            assert all(s.kind == "host" and s.stream == "compute" for s in graph.stages.values())
        finally:
            graph.close()
    finally:
        b.free()
        weights.free()


# ------------------------------------------------------------------------------ shard upload
def _host(t) -> np.ndarray:
    return t.to_numpy().astype(np.float32)


def _expected(part, name, dst) -> np.ndarray:
    """What the CPU shard view gives for ``name``, rounded as the destination stores it."""
    want = part.load(name, np.float32)
    return want.astype(dst.to_numpy().dtype).astype(np.float32) if dst.dtype == "bf16" else want


@pytest.mark.parametrize("tie, size", [(False, 2), (True, 2), (True, 1)])
def test_checkpoint_shard_streams_rows_and_maps_columns(cpu_rt, monkeypatch, tmp_path, tie, size):
    """Tied embeddings: the LM head's vocab rows lie inside the replicated embedding's bytes, which
    the loader refuses to read twice (the H200 run of TP=1 hit that): the head is a view of the
    embedding's rows, neither read nor copied again."""
    from helpers_hf import build_checkpoint

    from nexusrt.models.streaming.plan import _check_bounds

    path = build_checkpoint(tmp_path / "ckpt", heads=8, kv_heads=4, seed=3, architecture="Qwen2ForCausalLM", tie=tie)
    model = load_model(str(path))
    streamed = []
    copies = _HostCopies()
    monkeypatch.setattr(shard_upload, "call", copies.call)

    def load_on_host(rt, items, progress):  # the streaming loader's contract, by plain reads
        _check_bounds(items)  # the loader's own refusal of overlapping reads
        for item in items:
            streamed.append(item.info.name)
            raw = np.fromfile(item.info.file, np.uint8, item.info.nbytes, offset=item.info.offset)
            item.dst.copy_from(raw.view(item.info.np_dtype).reshape(item.info.shape), convert=True)
        return "report"

    monkeypatch.setattr(shard_upload, "load_checkpoint", load_on_host)
    try:
        part = shard(model.weights, ShardPlan(model.config, size), size - 1)
        weights, lay = _layout(part)
        try:
            stream = SimpleNamespace(handle=3, synchronize=lambda: None)
            assert shard_upload.fill_shard(cpu_rt, part, lay.assign, stream) == "report"
            for name, dst in lay.assign:
                assert np.array_equal(_host(dst), _expected(part, name, dst)), name
            head, embed = weights.lm_head, weights.embed
            assert np.array_equal(_host(head), _expected(part, "lm_head", head))  # this rank's vocab rows
            inside = embed.ptr <= head.ptr and head.ptr + head.nbytes <= embed.ptr + embed.nbytes
            assert inside == tie and ("lm_head" in dict(lay.assign)) != tie  # tied: a view, not loaded
        finally:
            weights.free()
        assert any(n.endswith("]") for n in streamed)  # row splits arrive narrowed
        assert not any(".o_proj" in n or "down_proj" in n for n in streamed)  # columns come through the map
        assert copies.log == []  # nothing read twice, nothing copied
    finally:
        model.weights.close()


class _HostCopies:
    """cuMemcpyDtoDAsync and cuMemcpy2DAsync on the CPU arena's host memory."""

    CUDA_MEMCPY2D = SimpleNamespace
    CUmemorytype = SimpleNamespace(CU_MEMORYTYPE_DEVICE=2)

    def __init__(self):
        self.log = []

    def call(self, name, *args):
        self.log.append(name)
        if name == "cuMemcpyDtoDAsync":
            dst, src, n, _ = args
            ctypes.memmove(dst, src, n)
        elif name == "cuMemcpy2DAsync":
            p, _ = args
            for r in range(p.Height):
                ctypes.memmove(p.dstDevice + r * p.dstPitch, p.srcDevice + r * p.srcPitch, p.WidthInBytes)
        else:
            raise AssertionError(name)


def test_synthetic_shard_is_generated_whole_then_cut_on_the_device(cpu_rt, monkeypatch):
    cfg = _config("qwen2_bias")
    copies = _HostCopies()
    monkeypatch.setattr(shard_upload, "call", copies.call)
    monkeypatch.setattr(copy_mod, "call", copies.call)  # the column copies' 2D form
    monkeypatch.setattr(copy_mod, "cu", lambda: copies)
    monkeypatch.setattr(shard_upload, "fill_synthetic_bf16",  # the device fill, by the same formula on the host
                        lambda rt, src, name, dst, stream: dst.copy_from(src.load(name), convert=True))
    part = shard(SyntheticWeights(cfg, seed=4), ShardPlan(cfg, 2), 1)
    weights, lay = _layout(part)
    try:
        shard_upload.fill_shard(cpu_rt, part, lay.assign, SimpleNamespace(handle=3, synchronize=lambda: None))
        for name, dst in lay.assign:
            assert np.array_equal(_host(dst), _expected(part, name, dst)), name
        assert {"cuMemcpyDtoDAsync", "cuMemcpy2DAsync"} == set(copies.log)
    finally:
        weights.free()
    assert memory.stats()["in_use_bytes"] == 0  # the scratch is freed


# ------------------------------------------------------------------------------ worker protocol
def _records(log_dir, size):
    return [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(size)]


@pytest.fixture
def uid_stub(monkeypatch):
    """The front's unique id without nccl4py (the workers get the recording stand-in)."""
    from nexusrt.backends.cuda import tp_front

    monkeypatch.setattr(tp_front, "unique_id", lambda: bytes(range(7, 135)))


def _process_runner(tmp_path, die_at=None):
    return ProcessRunner(WeightsOrigin("synthetic:tiny"), _config("llama_tiny"), 2, 48,
                         target=FakeRankTarget(tmp_path, die_at), gpus=2)


def test_workers_boot_on_their_gpus_and_answer_as_the_runner_does(tmp_path, uid_stub):
    runner = _process_runner(tmp_path)
    pids = runner.pids
    prompt = [3, 17, 99, 4]
    cfg = runner.config
    alone = FakeRankRunner(SimpleNamespace(config=cfg, weights=shard(SyntheticWeights(cfg), ShardPlan(cfg, 2), 0)),
                           None, 48, SimpleNamespace(rank=0, size=2, vocab_part=cfg.vocab_size // 2), record={})
    try:
        assert [r["device"] for r in runner.ready] == [0, 1] and runner.max_context == 48
        for params in (SamplingParams(temperature=0.8, top_k=20, seed=3), SamplingParams()):
            want, got = [], []
            generate_tokens(alone, prompt, 12, params, lambda t: want.append(t) and False)
            assert runner.generate_tokens(prompt, 12, params, lambda t: got.append(t) and False) == 12
            assert got == want and runner.position == len(prompt) + 11
        stop: list = []  # greedy again, stopped by the caller after 3 ids
        assert runner.generate_tokens(prompt, 12, SamplingParams(), lambda t: stop.append(t) or len(stop) == 3) == 3
        assert stop == want[:3] and runner.position == len(prompt) + 2
        assert np.array_equal(runner.last_logits(), logits_table(cfg.vocab_size)[stop[-2]])
        assert np.array_equal(runner.forward_all(prompt), logits_table(cfg.vocab_size)[prompt])
        with pytest.raises(ValueError, match="the context is 48"):  # every rank refuses alike: still usable
            runner.prefill(list(range(60)))
        assert runner.rank_timings() == {"upload_s": 0.0}
    finally:
        runner.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
    records = _records(tmp_path, 2)
    for rank, rec in enumerate(records):
        init = rec["nccl"][0]
        assert init == ["init", 2, bytes(range(7, 135)).hex(), rank]  # the front's id, through the pipe
        assert rec["nccl"][-1] == ["abort", "comm"]  # released on the way out
        assert rec["env"] == {"NCCL_NVLS_ENABLE": "0", "NCCL_RUNTIME_CONNECT": "0"}
        assert rec["local"] == {"heads": cfg.num_attention_heads // 2, "kv_heads": cfg.num_key_value_heads // 2,
                                "inter": cfg.intermediate_size // 2, "shard_rank": rank,
                                "lm_head_rows": cfg.vocab_size // 2, "tp": [rank, 2, cfg.vocab_size // 2]}
    assert records[0]["messages"] == records[1]["messages"]  # SPMD: every rank ran every step


def test_a_worker_that_dies_mid_decode_is_named_and_nothing_is_left(tmp_path, uid_stub):
    runner = _process_runner(tmp_path, die_at=(1, 6))
    pids = runner.pids
    try:
        with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+\) died during the decode step: exit code 9"):
            runner.generate_tokens([1, 2, 3, 4], 10, SamplingParams(), lambda t: False)
        with pytest.raises(WorkerDied, match="rank 1"):  # fatal: every later call names it again
            runner.reset()
    finally:
        runner.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()


def test_every_worker_answers_the_collective_timing_message(tmp_path, uid_stub):
    runner = _process_runner(tmp_path)
    pids = runner.pids
    try:
        times = runner.collective_times(2)
        with pytest.raises(ValueError, match="repeats must be an integer >= 1"):  # refused in the front
            runner.collective_times(0)
    finally:
        runner.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
    cfg = runner.config
    h, vl, layers = cfg.hidden_size, cfg.vocab_size // 2, cfg.num_hidden_layers
    step = [("all_reduce", h)] * (2 * layers) + [("all_gather", vl)]
    assert [t["rank"] for t in times] == [0, 1]
    for rank, (t, rec) in enumerate(zip(times, _records(tmp_path, 2))):
        assert t["all_reduces"] == 2 * layers and t["all_gathers"] == 1
        assert len(t["step_s"]) == 2 and all(x > 0 for x in t["step_s"])
        assert rec["messages"] == ["collective_times"]  # the refusal never reached a rank
        calls = [c for c in rec["nccl"] if c[0] in ("all_reduce", "all_gather")]
        assert _step_calls(calls, rank, h, vl, STREAM_BASE + rank) == step + [("all_reduce", h)] + step * 2


# ------------------------------------------------------------------------------ refusals
def test_refusals_come_before_any_process(cpu_rt, monkeypatch, uid_stub):
    import dataclasses

    origin, cfg = WeightsOrigin("synthetic:tiny"), _config("llama_tiny")
    with pytest.raises(BackendUnavailable, match="tensor_parallel=2 needs 2 GPUs .*shows 1"):
        ProcessRunner(origin, cfg, 2, gpus=1)
    with pytest.raises(ModelError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel=4"):
        ProcessRunner(origin, cfg, 4, gpus=8)
    odd = dataclasses.replace(cfg, intermediate_size=520)  # 260 per rank: not a multiple of 8
    with pytest.raises(ModelError, match="intermediate_size to be a multiple of 8"):
        ProcessRunner(origin, odd, 2, gpus=2)
    assert not multiprocessing.active_children()


def test_without_nccl4py_the_front_says_how_to_install(cpu_rt, monkeypatch):
    monkeypatch.setitem(sys.modules, "nccl", None)
    with pytest.raises(nccl_mod.NcclError, match=r"pip install 'nccl4py\[cu13\]'"):
        ProcessRunner(WeightsOrigin("synthetic:tiny"), _config("llama_tiny"), 2, gpus=2)
    assert not multiprocessing.active_children()


def test_the_host_tier_is_refused_over_cuda_ranks(cpu_rt):
    """(The batched engine over the ranks: ``test_cuda_tp_serve_cpu``.)"""
    from nexusrt.engine.runners import _cuda_ranks

    model = load_model("synthetic:tiny")
    try:
        with pytest.raises(BackendUnavailable, match="kv_gpu_budget / kv_fault_reserve with tensor_parallel > 1"):
            _cuda_ranks(model, 64, 2, 1 << 20, None)
    finally:
        model.weights.close()
