"""``CudaBatchRunner``'s step wiring on the CPU, for both prompt paths: a fake base runner, a
fake graph capture that records replays, recorded driver calls, and the real launchers through
the recording kernel cache of ``test_cuda_ragged_cpu``. What the GPU alone can say (the
numbers) is in ``test_cuda_batch``; this checks which work a mixed step enqueues and which
logits row each entry's pick is read from.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt import memory, scheduler
from nexusrt.backends.base import Rows
from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.backends.cuda.chunks import BUCKETS
from tests.test_cuda_ragged_cpu import _RecordingLt, _Rt, _Stream
from tests.test_cuda_step_cpu import _config, _device_weights, no_occupancy_query  # noqa: F401


class _Graph:
    def __init__(self, log, stages):
        self.log, self.name = log, stages[0].name.split(".")[0]

    def replay(self, stream=None):
        self.log.append(("replay", self.name))

    def close(self):
        pass


@pytest.fixture
def runner_parts(cpu_rt, no_occupancy_query, monkeypatch):
    rt = _Rt()
    rt.device = SimpleNamespace(handle=0, make_current=lambda: None)
    calls = []
    monkeypatch.setattr(scheduler, "capture", lambda stages, stream="compute": _Graph(rt.trace, stages))
    monkeypatch.setattr(batch_mod, "call", lambda name, *a: calls.append((name, *a)))
    cfg = _config("llama_tiny")
    w = _device_weights(cfg)
    base = SimpleNamespace(config=cfg, rt=rt, max_context=300, buckets=BUCKETS, weights=w, lt=_RecordingLt(rt.trace),
                           stream=_Stream())
    yield base, calls
    w.free()


def _step(rng):
    def rows(n, start, logits=True):
        return Rows(rng.integers(1, 250, n).astype(np.int32), start, rng.permutation(40)[:-(-(start + n) // 16)].tolist(),
                    logits=logits)
    # chunk (37 ids), decode, chunk (2 ids, mid-prompt: no logits), decode, chunk (5 ids)
    return [rows(37, 0), rows(1, 40), rows(2, 64, logits=False), rows(1, 100), rows(5, 130)]


@pytest.mark.parametrize("ragged", [True, False])
def test_a_mixed_step_enqueues_its_prompt_path_and_reads_each_pick_from_its_row(ragged, runner_parts):
    base, calls = runner_parts
    cfg, trace = base.config, base.rt.trace
    runner = batch_mod.CudaBatchRunner(base, 40, max_batch=8, max_chunk=256, ragged_prefill=ragged)
    try:
        graphs = {k[0] for k in runner._graphs}
        assert ("prefill" in graphs) == (not ragged) and ("logits" in graphs) == (not ragged)
        assert (runner.ragged is not None) == ragged and runner.pre.chunk == 256
        bmax = runner.bb.bmax
        runner.bb.h_next.array[:] = np.arange(len(runner.bb.h_next.array)) + 100  # pick = row + 100
        trace.clear()
        calls.clear()
        out = runner.run_tokens(_step(np.random.default_rng(1)))
        # Chunks j = 0, 1, 2 read rows bmax + j (the mid-prompt one has none); decodes rows 0 and 1.
        assert out == [100 + bmax, 100, None, 101, 100 + bmax + 2]
        replays = [t[1] for t in trace if t[0] == "replay"]
        attention = [t for t in trace if t[0].startswith("attention_prefill_mma")]
        gemm_rows = [t[1][0] for t in trace if t[0] == "gemm"]
        if ragged:  # 44 ids as one 64-row pass, three attention launches per layer, LM head of 4 rows
            assert replays == ["batch2"]
            assert len(attention) == 3 * cfg.num_hidden_layers and [a[2][6] for a in attention[:3]] == [37, 2, 5]
            assert gemm_rows == [64] * 4 * cfg.num_hidden_layers + [4]
        else:  # each chunk alone through a 64-row prefill graph, the LM-head graph for the two that sample
            assert replays == ["prefill64", "logits", "prefill64", "prefill64", "logits", "batch2"]
            assert attention == [] and gemm_rows == []
        argmax = [t for t in trace if t[0] == "argmax_rows"]
        assert len(argmax) == 1  # the chunks' picks (the batch graph picks its own rows)
        assert calls[-1][0] == "cuMemcpyDtoHAsync"  # the picks copied back, last
    finally:
        runner.close()
    assert memory.stats()["by_tag"].get("batch", 0) == 0
