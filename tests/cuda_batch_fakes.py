"""A fake GPU for the wiring tests of ``CudaBatchRunner`` on the CPU (``test_cuda_batch_cpu``,
``test_cuda_batch_sampling_cpu``, ``test_cuda_ragged_wiring_cpu``).

The runner under test is the real one: its buffers in the CPU arena, its graphs' stage chains
and the ragged programs built by the real launchers over tiny-llama weights. The fake stands in
for the device and does, in stream order, what the device would do to the bytes that decide
the picks:

- driver calls (``batch.call``): copies and word sets run at once on the arena's host memory;
- a captured graph replays its stages in order;
- kernels and GEMMs do nothing but a model small enough to follow by hand: the embedding writes
  each row's token id into its hidden row (NaN for an id outside the vocabulary), an RMSNorm
  passes the id on, the LM head (a GEMV or GEMM of the LM-head weight) writes ``table[id]`` into
  the logits row, ``attention_scores_rows`` (h2o) adds 1 to each slot a row attends to, and the
  batched sampler's finish kernel picks each row by
  :func:`nexusrt.reference.sampling.sample` from the params struct and step it finds in device
  memory at that moment.

So an entry's pick is ``sample(table[its last id], its params, its step)`` (:meth:`FakeDevice.expected`)
only if the ids, copies, logits rows, sampler staging and launches all line up. Staging and
device buffers start out stale (``poison``), as pinned and device memory do between steps.

``log`` holds what the runner enqueued, in order (work inside a graph replay is not listed):
("h2d", dst, src, nbytes, the int32 words), ("d2d", dst, src, nbytes), ("set", dst, value),
("d2h", dst, src, nbytes), ("fill", dst, value, words), ("replay", graph name), ("launch", kernel name, grid, args),
("gemm", (m, n, k), y). ``overwritten``: host-to-device copies whose source changed between
their enqueue and the next synchronize (the device may read it any time in between). The clock
ticks once per read, and ``WAIT`` more in a synchronize that has work to wait for.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt import memory, scheduler
from nexusrt.backends import base as base_mod
from nexusrt.backends.base import Rows
from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.kernels.ops import sampling as sampling_ops
from nexusrt.reference.sampling import SamplingParams, sample
from tests.fakes import FakeKernel, FakeRuntime
from tests.test_cuda_step_cpu import _config, _device_weights, no_occupancy_query  # noqa: F401

WAIT = 1000.0
NAN_PICK = 2**31 - 1  # the sampler's pick for a greedy row of NaN
STALE_PARAMS = sampling_ops.pack_params(2.0, 0, 1.0, 99)  # what an earlier step left in a params row
STALE_STEP = 12345


def _view(addr: int, dtype, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` at host address ``addr``, writable in place."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * (dtype.itemsize * count)).from_address(addr), dtype)


class _Kernel(FakeKernel):
    def __init__(self, dev, name):
        super().__init__(name)
        self.dev = dev

    def pack(self, *values):  # a list: the ragged path rebinds attention specs in place
        return [getattr(v, "ptr", v) for v in values]

    def launch(self, grid, block, args, stream=None, shared=0, pdl=False):
        self.dev.launch(self.name, tuple(grid), tuple(args))


class _Graph:
    def __init__(self, dev, stages):
        self.dev, self.stages, self.name = dev, stages, stages[0].name.split(".")[0]

    def replay(self):
        self.dev.replay(self)

    def close(self):
        pass


class FakeDevice:
    """See the module docstring. ``runner(...)`` makes the runner under test."""

    def __init__(self, monkeypatch):
        self.log, self.overwritten, self.clock, self.runners = [], [], 0.0, []
        self._pending, self._synced, self._quiet = [], 0, False
        self.cfg = _config("llama_tiny")
        vocab = self.cfg.vocab_size
        self.table = (np.random.default_rng(7).standard_normal((vocab, vocab))).astype(np.float32)
        self.rt = FakeRuntime()
        self.rt.kernels = SimpleNamespace(get=lambda source, name, sig: _Kernel(self, name))
        self.rt.device = SimpleNamespace(handle=0, make_current=lambda: None)
        self.weights = _device_weights(self.cfg)
        self.stream = SimpleNamespace(handle=7, synchronize=self.synchronize)
        monkeypatch.setattr(scheduler, "capture", lambda stages, stream="compute": _Graph(self, stages))
        monkeypatch.setattr(batch_mod, "call", self.call)
        copy_mod = sys.modules["nexusrt.memory.copy"]  # the 2D copies a rank's logits rows are unpacked by
        monkeypatch.setattr(copy_mod, "call", self.call)
        self.batch_copies = False  # True: the driver has cuMemcpyBatchAsync (set before runner())
        monkeypatch.setattr(copy_mod, "cu", self._cu)
        monkeypatch.setattr(batch_mod, "time", SimpleNamespace(perf_counter=self.now))

    def runner(self, ragged: bool = True, deterministic: bool = False, tp=None,
               host_blocks: int = 0) -> batch_mod.CudaBatchRunner:
        """A runner of context 256 over 60 blocks (scratch block 60, tables of 20), max_batch 4,
        max_chunk 128, with stale staging and device buffers and an empty log (``tp``: a one-rank
        RankComm, whose LM head is the whole vocabulary)."""
        lt = SimpleNamespace(plan=lambda problem: SimpleNamespace(
            problem=problem, run=lambda lt, y, w, x, bias, stream: self.gemm(problem, y, w, x)))
        base = SimpleNamespace(config=self.cfg, rt=self.rt, max_context=256, buckets=(64, 128, 256),
                               weights=self.weights, lt=lt, stream=self.stream, tp=tp)
        r = batch_mod.CudaBatchRunner(base, 60, max_batch=4, max_chunk=128, deterministic=deterministic,
                                      ragged_prefill=ragged, host_blocks=host_blocks)
        self.runners.append(r)
        self.synchronize()
        self.poison(r)
        self.log.clear()
        return r

    def close(self) -> None:
        for r in self.runners:
            r.close()
        self.weights.free()

    # -- what the tests read -------------------------------------------------------------------
    def expected(self, batch: list[Rows]) -> list[int | None]:
        """What ``run_tokens(batch)`` must return under the fake's model."""
        return base_mod.sample_rows(batch, [self.table[r.token_ids[-1]] if r.logits else None for r in batch])

    def kinds(self, *kinds) -> list[tuple]:
        return [e for e in self.log if e[0] in kinds]

    def work(self) -> list[str]:
        """The names of the replays, launches and GEMMs, in order."""
        return [e[1] if e[0] != "gemm" else "gemm" for e in self.kinds("replay", "launch", "gemm")]

    def copy_to(self, dst) -> list[tuple]:
        """The host-to-device copies into ``dst`` (a tensor)."""
        return [e for e in self.kinds("h2d") if e[1] == dst.ptr]

    def poison(self, r) -> None:
        """Stale bytes everywhere a step reads before writing (nothing is cleared between steps)."""
        bb, pre = r.bb, r.pre
        stale = [bb.h_ids, bb.h_prompt, bb.h_meta, bb.h_tables, bb.h_pre_tables, bb.h_steps, bb.h_next, bb.next, bb.ids,
                 pre.ids]
        if r.ragged is not None:
            buf = r.ragged.buf
            stale += [buf.h_ids, buf.h_meta, buf.h_tables, buf.h_starts]
        for t in stale:
            t.array[...] = -7
        bb.h_params.array[...] = 0xAB
        bb.params.array[:] = STALE_PARAMS
        bb.steps.array[:] = STALE_STEP
        for t in (bb.logits, bb.hidden, pre.logits, pre.hidden, bb.rank_logits, bb.gathered):
            if t is not None:
                t.array[...] = np.nan

    # -- the device ----------------------------------------------------------------------------
    def now(self) -> float:
        self.clock += 1.0
        return self.clock

    def synchronize(self) -> None:
        for dst, src, n, data in self._pending:
            if ctypes.string_at(src, n) != data:
                self.overwritten.append((dst, src, n))
        if len(self.log) > self._synced:  # work was queued since the last synchronize
            self.clock += WAIT
        self._pending, self._synced = [], len(self.log)

    def _cu(self):
        ns = SimpleNamespace(CUDA_MEMCPY2D=SimpleNamespace, CUmemorytype=SimpleNamespace(CU_MEMORYTYPE_DEVICE=2),
                             CUmemcpyAttributes=SimpleNamespace, CUdeviceptr=int,
                             CUmemcpySrcAccessOrder=SimpleNamespace(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM=1))
        if self.batch_copies:
            ns.cuMemcpyBatchAsync = object()
        return ns

    def call(self, name, *args):
        if name == "cuDriverGetVersion":
            return 13000
        if name == "cuMemcpyBatchAsync":  # ("batch", [(dst, src, nbytes), ...]); the copies may run in any order
            dsts, srcs, sizes, count, attrs, idxs, nattrs, _ = args
            assert count == len(dsts) == len(srcs) == len(sizes) and (idxs, nattrs) == ([0], 1)
            assert attrs[0].srcAccessOrder == 1  # sources read in stream order
            copies = list(zip(dsts, srcs, sizes))
            spans = sorted((d, d + n) for d, _, n in copies)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two copies of a batch write one byte"
            assert not any(d < s + n and s < d + m for d, _, m in copies for _, s, n in copies), \
                "a copy of a batch reads what another writes"
            self.log.append(("batch", copies))
            for d, s, n in copies:
                ctypes.memmove(d, s, n)
            return None
        if name == "cuMemcpyHtoDAsync":
            dst, src, n, _ = args
            data = ctypes.string_at(src, n)
            self._pending.append((dst, src, n, data))
            self.log.append(("h2d", dst, src, n, np.frombuffer(data, np.int32)))
            ctypes.memmove(dst, src, n)
        elif name in ("cuMemcpyDtoDAsync", "cuMemcpyDtoHAsync"):
            dst, src, n, _ = args
            self.log.append(("d2d" if name == "cuMemcpyDtoDAsync" else "d2h", dst, src, n))
            ctypes.memmove(dst, src, n)
        elif name == "cuMemcpy2DAsync":
            p, _ = args
            self.log.append(("2d", p.dstDevice, p.srcDevice, p.WidthInBytes, p.Height))
            for r in range(p.Height):
                ctypes.memmove(p.dstDevice + r * p.dstPitch, p.srcDevice + r * p.srcPitch, p.WidthInBytes)
        elif name == "cuMemsetD32Async":
            dst, value, count, _ = args
            self.log.append(("set", dst, value) if count == 1 else ("fill", dst, value, count))
            _view(dst, np.uint32, count)[:] = value
        else:
            raise AssertionError(f"unexpected driver call {name}")

    def replay(self, graph: _Graph) -> None:
        self.log.append(("replay", graph.name))
        self._quiet = True
        try:
            for s in graph.stages:
                s.kernel.launch(self.stream) if s.kind == "launch" else s.kernel(self.stream)
        finally:
            self._quiet = False

    def launch(self, name: str, grid, args) -> None:
        if not self._quiet:
            self.log.append(("launch", name, grid, args))
        h, vocab = self.cfg.hidden_size, self.cfg.vocab_size
        if name == "embedding":
            out, ids, _, m = args[:4]
            for r, i in enumerate(_view(ids, np.int32, m)):
                _view(out + 4 * h * r, np.float32, h)[:] = i if 0 <= i < vocab else np.nan
        elif name == "rms_norm_bf16":  # passes the id on as the bf16 slot's raw bits
            out, x, _, rows, cols = args[:5]
            for r in range(rows):
                v = _view(x + 4 * cols * r, np.float32, 1)[0]
                _view(out + 2 * cols * r, np.uint16, 1)[0] = int(v) if 0 <= v < vocab else 0xFFFF
        elif name.startswith("gemv") and args[1] == self.weights.lm_head.ptr:
            y, _, x = args[:3]
            self._lm_head(y, [_view(x, np.float32, 1)[0]])
        elif name == "sample_rows_finish":
            self._sample_rows(*args)
        elif name == "attention_scores_rows":  # h2o: one unit of mass to every slot a row attends to
            _, _, meta, scores, _, stride = args
            for r in range(grid[1]):
                _view(scores + 4 * stride * r, np.float32, stride)[:_view(meta + 16 * r + 4, np.int32, 1)[0] + 1] += 1

    def gemm(self, problem, y: int, w: int, x: int) -> None:
        if not self._quiet:
            self.log.append(("gemm", (problem.m, problem.n, problem.k), y))
        if w == self.weights.lm_head.ptr:
            k = problem.k
            self._lm_head(y, [_view(x + 2 * k * r, np.uint16, 1)[0] for r in range(problem.m)])

    def _lm_head(self, y: int, ids) -> None:
        vocab = self.cfg.vocab_size
        for r, i in enumerate(ids):
            _view(y + 4 * vocab * r, np.float32, vocab)[:] = self.table[int(i)] if 0 <= i < vocab else np.nan

    def _sample_rows(self, logits, vocab, params, steps, part_val, part_idx, parts, out, m) -> None:
        size = sampling_ops.PARAMS_BYTES
        for r in range(m):
            row = _view(logits + 4 * vocab * r, np.float32, vocab)
            t, k, p, _, seed = struct.unpack(sampling_ops.PARAMS_FORMAT, ctypes.string_at(params + size * r, size))
            if t > 0:
                step = int(_view(steps + 4 * r, np.int32, 1)[0])
                pick = sample(row, SamplingParams(float(t), k, float(p), seed), step)
            else:
                pick = NAN_PICK if np.isnan(row).all() else int(np.argmax(row))
            _view(out + 4 * r, np.int32, 1)[0] = pick


@pytest.fixture
def dev(cpu_rt, no_occupancy_query, monkeypatch):
    d = FakeDevice(monkeypatch)
    yield d
    d.close()
    assert memory.stats()["in_use_bytes"] == 0


def one(token: int, start: int, table, **kw) -> Rows:
    """A step entry of one id."""
    return Rows(np.asarray([token], np.int32), start, list(table), **kw)


def chunk(ids, start: int, table, **kw) -> Rows:
    """A step entry of several ids (a prompt chunk)."""
    return Rows(np.asarray(ids, np.int32), start, list(table), **kw)


def row_table(r, table) -> list[int]:
    """A block table as the runner stages it: padded with the scratch block to the width."""
    return list(table) + [r.scratch] * (r.width - len(table))
