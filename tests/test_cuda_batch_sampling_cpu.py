"""The CUDA batch runner's step wiring on the CPU: the real ``CudaBatchRunner`` over buffers of
the CPU arena, its graphs, driver calls and kernel launches replaced by recorders. Checks that
``run_tokens`` stages every logits row's sampling parameters and step before any launch, picks
every row with the batched sampler (the decode graph's rows, the lone-decode row, the prompt
chunks' rows), and copies nothing but the picks back to the host: no logits row, however the
entry samples.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt.backends.base import Rows
from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.kernels.ops import sampling as sampling_ops
from nexusrt.models.presets import preset
from nexusrt.reference.sampling import SamplingParams
from tests.fakes import FakeKernel, FakeRuntime

PICK_BASE = 100  # the fake device's pick for logits row r is PICK_BASE + r


class _Recorder:
    """What the runner asked of the device, in order: ("call", name, dst, nbytes), ("replay", key),
    ("launch", kernel name, grid)."""

    def __init__(self):
        self.log: list[tuple] = []


def _runner(monkeypatch, rec: _Recorder, deterministic=False):
    cfg = dataclasses.replace(preset("tiny"))
    rt = FakeRuntime()
    rt.device = SimpleNamespace(handle=0, make_current=lambda: None)

    class Kernel(FakeKernel):
        def launch(self, grid, block, args, stream, shared, pdl=False):
            rec.log.append(("launch", self.name, tuple(grid)))

    rt.kernels = SimpleNamespace(get=lambda source, name, sig: Kernel(name))

    class Graph:
        def __init__(self, key):
            self.key = key

        def replay(self):
            rec.log.append(("replay", self.key))

        def close(self):
            pass

    def capture(self):
        keys = [("prefill", m) for m in self.prefill_buckets] + [("logits",), ("decode1",)]
        self._graphs.update((k, Graph(k)) for k in keys + [("batch", m) for m in self.batch_buckets])

    monkeypatch.setattr(batch_mod.CudaBatchRunner, "_capture", capture)
    monkeypatch.setattr(batch_mod.CudaBatchRunner, "_fixed_chunk", lambda self: 256)
    base = SimpleNamespace(config=cfg, rt=rt, max_context=256, buckets=(64, 128, 256), stream=None, weights=None,
                           lt=None)
    base.stream = SimpleNamespace(handle=7, synchronize=lambda: None)
    runner = batch_mod.CudaBatchRunner(base, 60, max_batch=4, max_chunk=128, deterministic=deterministic)

    def call(name, *args):
        dst, nbytes = (args[0], args[2]) if name.startswith("cuMemcpy") else (args[0], None)
        rec.log.append(("call", name, dst, nbytes))
        if name == "cuMemcpyDtoHAsync" and dst == runner.bb.h_next.ptr:
            h = runner.bb.h_next.array
            h[:] = PICK_BASE + np.arange(h.size)  # the device's picks

    monkeypatch.setattr(batch_mod, "call", call)
    return runner


SAMPLE_A = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=11)
SAMPLE_B = SamplingParams(temperature=1.3, top_k=0, top_p=1.0, seed=None)  # unset seed: 0, as the reference


def _single(token, start, table, **kw):
    return Rows(np.asarray([token], np.int32), start, table, **kw)


def test_a_mixed_step_samples_every_row_on_the_device(cpu_rt, monkeypatch):
    rec = _Recorder()
    runner = _runner(monkeypatch, rec)
    bb, bmax = runner.bb, runner.bb.bmax
    try:
        batch = [_single(5, 20, [1, 2], logits=True),  # greedy (params None): batch row 0
                 Rows(np.arange(1, 30, dtype=np.int32), 0, [3, 4], logits=True, params=SAMPLE_A, step=0),  # chunk 0
                 _single(6, 40, [5, 6, 7], logits=True, params=SAMPLE_B, step=41),  # batch row 1
                 _single(7, 3, [8], logits=False, params=SAMPLE_A, step=9),  # batch row 2: no pick
                 Rows(np.arange(1, 10, dtype=np.int32), 0, [9], logits=False),  # chunk 1: no pick
                 _single(8, 10, [10], logits=True, params=SamplingParams(seed=3), step=2)]  # greedy: row 3
        out = runner.run_tokens(batch)
        assert out == [PICK_BASE + 0, PICK_BASE + bmax, PICK_BASE + 1, None, None, PICK_BASE + 3]
        # Staging: only the sampling rows that want a pick carry a struct; every other row is zero (greedy).
        params, steps = bb.h_params.array, bb.h_steps.array
        want = np.zeros_like(params)
        want[bmax] = sampling_ops.pack_params(0.7, 50, 0.9, 11)
        want[1] = sampling_ops.pack_params(1.3, 0, 1.0, 0)
        assert (params == want).all()
        assert steps.tolist() == [0, 41] + [0] * (bmax - 2) + [0] * (len(steps) - bmax)
        # Both arrays go to the device whole, before any graph replay or launch.
        first_work = next(i for i, e in enumerate(rec.log) if e[0] in ("replay", "launch"))
        copies = {e[2]: (i, e[3]) for i, e in enumerate(rec.log) if e[:2] == ("call", "cuMemcpyHtoDAsync")}
        for dev, host in ((bb.params, bb.h_params), (bb.steps, bb.h_steps)):
            at, nbytes = copies[dev.ptr]
            assert at < first_work and nbytes == host.nbytes == dev.nbytes
        # The batch graph of bucket 4, the sampler over the two chunk rows; only the picks come back.
        assert ("replay", ("batch", 4)) in rec.log and ("replay", ("decode1",)) not in rec.log
        parts = sampling_ops.num_parts(runner.config.vocab_size)
        launches = [e[1:] for e in rec.log if e[0] == "launch"]
        assert launches == [("sample_rows_partial", (parts, 2, 1)), ("sample_rows_finish", (2, 1, 1))]
        d2h = [e for e in rec.log if e[:2] == ("call", "cuMemcpyDtoHAsync")]
        assert d2h == [("call", "cuMemcpyDtoHAsync", bb.h_next.ptr, bb.h_next.nbytes)]
        assert list(runner._samplers) == [(bmax, 2)]
    finally:
        runner.close()


def test_a_lone_sampling_decode_takes_the_gemv_graph_and_the_sampler_over_row_0(cpu_rt, monkeypatch):
    rec = _Recorder()
    runner = _runner(monkeypatch, rec)
    try:
        assert runner.run_tokens([_single(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=7)]) == [PICK_BASE]
        assert runner.bb.h_params.array[0].tobytes() == sampling_ops.pack_params(0.7, 50, 0.9, 11).tobytes()
        assert runner.bb.h_steps.array[0] == 7
        order = [e[1] for e in rec.log if e[0] in ("replay", "launch")]
        assert order == [("decode1",), "sample_rows_partial", "sample_rows_finish"]
        assert not any(e[1] == "cuMemcpyDtoHAsync" and e[2] != runner.bb.h_next.ptr for e in rec.log)
        # The next step's greedy entry clears the struct a sampling row left behind.
        runner.run_tokens([_single(5, 21, [1, 2], logits=True)])
        assert not runner.bb.h_params.array.any() and not runner.bb.h_steps.array.any()
    finally:
        runner.close()


def test_deterministic_mode_samples_a_lone_decode_in_the_largest_bucket(cpu_rt, monkeypatch):
    rec = _Recorder()
    runner = _runner(monkeypatch, rec, deterministic=True)
    try:
        assert runner.run_tokens([_single(5, 20, [1, 2], logits=True, params=SAMPLE_B, step=1)]) == [PICK_BASE]
        assert [e[1] for e in rec.log if e[0] in ("replay", "launch")] == [("batch", 4)]  # sampler in the graph
    finally:
        runner.close()


@pytest.mark.parametrize("step", [-1, 2**31, 1.5, True])
def test_a_sampling_step_the_kernel_cannot_hold_is_refused_before_any_launch(cpu_rt, monkeypatch, step):
    rec = _Recorder()
    runner = _runner(monkeypatch, rec)
    try:
        with pytest.raises(ValueError, match="step must be an integer"):
            runner.run_tokens([_single(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=step)])
        assert not any(e[0] in ("replay", "launch") for e in rec.log)
    finally:
        runner.close()
