"""cuBLASLt for the tensor-core GEMMs, through nvmath-python's low-level bindings.

``nvmath.bindings.cublasLt`` takes plain integers for every pointer, descriptor, the
workspace and the stream, so cuBLASLt runs on arena memory and on our own streams (and
inside our CUDA-graph captures) with no framework in between. An :class:`LtContext` holds
the handle, a workspace in the arena and one :class:`LtPlan` per problem (descriptors,
layouts and the heuristic's algorithm, chosen once per shape); its owner (a model runner,
a benchmark) closes it, which frees the workspace, so the leak audit sees who held what.

Row-major ``Y[M, N] = X[M, K] . W[N, K]^T`` is, in cuBLASLt's column-major terms,
``Y^T (N x M) = op_T(W as K x N) . (X^T as K x M)``: A = W with TRANSA = T, B = X, and
D = Y with leading dimension N. A bias epilogue then adds a vector of length N to every
row of Y, and ``beta = 1`` with C = D adds the residual in place.

Nothing here runs at import: the bindings are imported when a context is made, which
needs a runtime booted on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import BackendUnavailable, NexusRTError

CUDA_R_32F, CUDA_R_16BF = 0, 14  # cudaDataType_t
COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
OP_T = 1  # cublasOperation_t
WORKSPACE_BYTES = 32 << 20  # what NVIDIA recommends for Hopper
CANDIDATES = 8  # algorithms asked of the heuristic; with tuning, each is timed once per problem
TUNE_MIN_FLOPS = 1e10  # smaller problems keep the heuristic's first choice (tuning them costs load time)
DTYPES = {"bf16": CUDA_R_16BF, "fp32": CUDA_R_32F}
INSTALL_HINT = ("the tensor-core GEMMs run on cuBLASLt through nvmath-python: install both with "
                "pip install 'nexusrt[cuda]' (nvmath-python and nvidia-cublas)")


def bindings():
    """``nvmath.bindings.cublasLt``, or BackendUnavailable saying what to install."""
    try:
        from nvmath.bindings import cublasLt
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from None
    return cublasLt


@dataclass(frozen=True)
class Problem:
    """One GEMM shape and its epilogue: ``y[m, n] (out) = x[m, k] (bf16) . w[n, k]^T (bf16)``,
    plus a bias of dtype ``bias`` (or None) and, with ``residual``, ``+ y`` (fp32 only)."""

    m: int
    n: int
    k: int
    out: str = "fp32"
    bias: str | None = None
    residual: bool = False

    def __post_init__(self):
        for name in ("m", "n", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"GEMM {name} must be a positive int, got {v!r}")
        if self.out not in DTYPES:
            raise ValueError(f"GEMM output dtype must be one of {', '.join(DTYPES)}, got {self.out!r}")
        if self.bias is not None and self.bias != self.out:
            raise ValueError(f"the bias epilogue takes a bias of the output's dtype ({self.out}), got {self.bias}")
        if self.residual and self.out != "fp32":
            raise ValueError("the residual epilogue accumulates into the fp32 residual stream: out must be fp32")
        if self.k % 8 or self.n % 8:
            raise ValueError(f"cuBLASLt's bf16 tensor-core GEMMs need n and k multiples of 8 (16-byte rows); "
                             f"got n={self.n}, k={self.k}")

    def column_major(self) -> dict:
        """The cuBLASLt view: rows, columns and leading dimension of A (W), B (X) and C/D (Y)."""
        return {"a": (self.k, self.n, self.k), "b": (self.k, self.m, self.k), "d": (self.n, self.m, self.n)}

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


class LtPlan:
    """Descriptors, layouts and the chosen algorithm for one :class:`Problem`.

    The heuristic ranks up to :data:`CANDIDATES` algorithms. Untuned, the first is used.
    Tuned (``ctx.tune``), each candidate runs on random operands of the problem's shape and
    the fastest (median of a few runs, CUDA events) is kept: the heuristic's first choice was
    measured below the best on some prefill shapes. ``choice``, ``times_ms`` record what was
    chosen and why.
    """

    def __init__(self, ctx: "LtContext", problem: Problem):
        lt = ctx.lt
        self.problem, self.lt = problem, lt
        self._made: list[tuple] = []  # (destroy function, handle) in creation order
        try:
            self.desc = self._make(lt.matmul_desc_create(COMPUTE_32F, CUDA_R_32F), lt.matmul_desc_destroy)
            _set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.TRANSA, np.int32(OP_T))
            if problem.bias is not None:
                _set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.EPILOGUE,
                     np.uint32(int(lt.Epilogue.BIAS)))
                _set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.BIAS_DATA_TYPE,
                     np.int32(DTYPES[problem.bias]))
            views = problem.column_major()
            self.a = self._make(lt.matrix_layout_create(CUDA_R_16BF, *views["a"]), lt.matrix_layout_destroy)
            self.b = self._make(lt.matrix_layout_create(CUDA_R_16BF, *views["b"]), lt.matrix_layout_destroy)
            self.d = self._make(lt.matrix_layout_create(DTYPES[problem.out], *views["d"]), lt.matrix_layout_destroy)
            self.alpha = np.ones(1, np.float32)
            self.beta = np.array([1.0 if problem.residual else 0.0], np.float32)
            self.results, self.count = self._candidates(ctx)
            self.choice, self.times_ms = 0, []
            self.algo = self._algo(0)
            if ctx.tune and self.count > 1 and problem.flops >= TUNE_MIN_FLOPS:
                self._tune(ctx)
        except BaseException:
            self.close()
            raise

    def _make(self, handle, destroy):
        self._made.append((destroy, handle))
        return handle

    def _candidates(self, ctx):
        lt, p = self.lt, self.problem
        pref = lt.matmul_preference_create()
        try:
            _set(lt.matmul_preference_set_attribute, pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES,
                 np.uint64(WORKSPACE_BYTES))
            results = np.zeros(CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, np.int32)
            lt.matmul_algo_get_heuristic(ctx.handle, self.desc, self.a, self.b, self.d, self.d, pref, CANDIDATES,
                                         results.ctypes.data, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        if int(count[0]) < 1:
            raise NexusRTError(f"cuBLASLt found no algorithm for {p}")
        return results, int(count[0])

    def _algo(self, i: int) -> int:
        """Address of candidate ``i``'s algorithm (the first field of its heuristic result)."""
        return self.results.ctypes.data + i * self.results.dtype.itemsize

    def _tune(self, ctx) -> None:
        import statistics

        from ... import memory
        from ...driver.calls import call
        from ...driver.streams import Event
        from .elementwise import fill_uniform_bf16

        p, rt = self.problem, ctx.rt
        stream = rt.streams["compute"]
        x = memory.empty((p.m, p.k), "bf16", tag="cublaslt")
        w = memory.empty((p.n, p.k), "bf16", tag="cublaslt")
        y = memory.empty((p.m, p.n), p.out, tag="cublaslt")
        bias = memory.empty((p.n,), p.bias, tag="cublaslt") if p.bias else None
        start, stop = Event("cuda"), Event("cuda")
        try:
            # Random operands, never zeros (zeros run faster than real data); a residual output
            # starts as 0.5 everywhere and grows a little with each run, which changes no timing.
            fill_uniform_bf16(rt, x.reshape(p.m * p.k), p.m * p.k, 91, 1.0).launch(stream)
            fill_uniform_bf16(rt, w.reshape(p.n * p.k), p.n * p.k, 92, 0.05).launch(stream)
            if p.out == "fp32":
                call("cuMemsetD32Async", y.ptr, 0x3F000000, p.m * p.n, stream.handle)
            if bias is not None:
                call("cuMemsetD8Async", bias.ptr, 0x3C, bias.nbytes, stream.handle)
            for i in range(self.count):
                self.algo = self._algo(i)
                samples = []
                for r in range(4):
                    start.record(stream)
                    self.run(ctx, y.ptr, w.ptr, x.ptr, bias.ptr if bias is not None else 0, int(stream.handle))
                    stop.record(stream)
                    stop.synchronize()
                    if r:
                        samples.append(start.elapsed_ms(stop))
                self.times_ms.append(statistics.median(samples))
        finally:
            stream.synchronize()
            start.destroy()
            stop.destroy()
            for t in (x, w, y, bias):
                if t is not None:
                    t.free()
        self.choice = int(np.argmin(self.times_ms))
        self.algo = self._algo(self.choice)

    def run(self, ctx: "LtContext", y: int, w: int, x: int, bias: int, stream: int) -> None:
        """Enqueue ``y = x . w^T (+ bias) (+ y)`` on ``stream`` (raw addresses and handle)."""
        lt = self.lt
        if self.problem.bias is not None:
            _set(lt.matmul_desc_set_attribute, self.desc, lt.MatmulDescAttribute.BIAS_POINTER, np.uint64(bias))
        lt.matmul(ctx.handle, self.desc, self.alpha.ctypes.data, w, self.a, x, self.b, self.beta.ctypes.data,
                  y, self.d, y, self.d, self.algo, ctx.workspace.ptr, WORKSPACE_BYTES, stream)

    def close(self) -> None:
        while self._made:
            destroy, handle = self._made.pop()
            destroy(handle)


def _set(setter, obj, attr, value: np.ndarray) -> None:
    buf = np.asarray(value).reshape(1)
    setter(obj, int(attr), buf.ctypes.data, buf.nbytes)


class LtContext:
    """cuBLASLt for one owner on ``rt``'s device: handle, arena workspace, a plan per problem.
    ``close()`` releases all three (safe twice)."""

    def __init__(self, rt, tune: bool = True):
        from ... import memory

        if not rt.is_cuda:
            raise BackendUnavailable("cuBLASLt needs the runtime booted on CUDA")
        self.lt = bindings()
        self.rt, self.tune = rt, bool(tune)
        rt.device.make_current()
        try:
            self.handle = self.lt.create()
        except Exception as exc:  # nvmath could not load libcublasLt, or the call failed
            raise BackendUnavailable(f"{INSTALL_HINT}; cublasLtCreate failed: {type(exc).__name__}: {exc}") from None
        self.version = int(self.lt.get_version())
        try:
            self.workspace = memory.empty((WORKSPACE_BYTES,), "uint8", tag="cublaslt")
        except BaseException:
            self.lt.destroy(self.handle)
            raise
        self.plans: dict[Problem, LtPlan] = {}

    def plan(self, problem: Problem) -> LtPlan:
        p = self.plans.get(problem)
        if p is None:
            p = self.plans[problem] = LtPlan(self, problem)
        return p

    def close(self) -> None:
        for p in self.plans.values():
            p.close()
        self.plans.clear()
        if self.workspace is not None and self.workspace.is_live:
            self.workspace.free()
        self.workspace = None
        if self.handle is not None:
            self.lt.destroy(self.handle)
            self.handle = None

    free = close  # what the benchmarks call on everything they keep alive

