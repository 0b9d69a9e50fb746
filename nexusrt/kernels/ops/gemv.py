"""Decode GEMV launcher: ``y[M, N] = W[N, K] . x[M, K]`` (fp32 out, bf16 W, fp32 x), M <= 8.

Epilogues: ``+ bias`` (bf16/fp32 [N]), ``+ residual`` (fp32 [M, N], may be ``y`` itself),
fused input RMSNorm (``norm_weight`` fp32 [K]: x is normalised inside the kernel), and
``gate_up`` (W is [2I, K], gate rows then up rows; y[M, I] = silu(gate) * up).

Where x does not fit in 96 KB of shared memory (``SMEM_LIMIT``) the kernel splits K;
it then needs a zero-initialised workspace of :func:`plan_gemv` ``(...).workspace_bytes``
(fp32 partials followed by int32 row counters that the kernel leaves at zero again, so one
workspace serves every launch and graph replay of the same plan). Results are
deterministic: the last split of a row sums the partials in split order.

One token, unsplit, on sm_90: ``ring=True`` (or ``NEXUSRT_GEMV_RING=1``) launches
``cu/gemv_ring.cu`` instead, the same sums with the weights streamed into shared memory by the
bulk-copy engine (``gemv_ring.py``; measured slower on the H200, so not the default).

One token with 16-byte loads: ``NEXUSRT_GEMV_SLIM=1`` launches the ``_slim`` entries (fewer
loads a step, at most 80 registers: three blocks fit an SM), the same sums; with
``NEXUSRT_GEMV_BLOCKS_PER_SM=2`` the third slot is left to the next kernel (a comparison of
the boundary between GEMVs; both measured slower on the H200: kernels/NOTES.md, end of "gemv_ring").
"""

from __future__ import annotations

from dataclasses import dataclass

from . import gemv_ring
from .common import (blocks_per_sm, ceil_div, check_aligned, check_positive, check_tensor, env_int,
                     epilogue_flags, pdl_ok, ptr, sm_count)
from .spec import BenchCase, LaunchSpec

SOURCE = "gemv"
THREADS = 256
WARPS = THREADS // 32
SIGNATURE = "ptr ptr ptr ptr ptr ptr f32 i32 i32 i32 ptr ptr i32"
RING_SIGNATURE = "ptr ptr ptr ptr ptr ptr f32 i32 i32 i32 i32"  # gemv_ring_{rows|gateup}
MAX_M = 8
# Staged x per block; above this K is split. Two 256-thread blocks of ~100 registers fit an
# SM and 2 x 96 KB is within its 227 KB, so the 8B down (57 KB of x) runs unsplit: split in two
# it took 36.2 us alone against 31.9 unsplit, 3% of the 8B token (H200, BENCHMARKS.md).
SMEM_LIMIT = 96 * 1024


@dataclass(frozen=True)
class GemvPlan:
    """How a GEMV shape is launched: kernel variant, split-K factor, smem and workspace."""

    m: int
    n: int  # outputs per token (I for gate_up)
    k: int
    gate_up: bool
    mmax: int  # compiled token count (power of two >= m)
    vec: int  # 8: 16-byte loads (K % 8 == 0); 1: scalar path
    splits: int
    chunks_per_split: int
    shared: int  # dynamic shared memory bytes
    workspace_bytes: int  # 0 when splits == 1

    @property
    def kernel_name(self) -> str:
        return f"gemv_m{self.mmax}_{'gateup' if self.gate_up else 'rows'}_v{self.vec}"

    @property
    def rows(self) -> int:
        """Rows of W read (2N for gate_up)."""
        return self.n * (2 if self.gate_up else 1)

    @property
    def counters_offset(self) -> int:
        return self.splits * self.m * self.rows * 4


def plan_gemv(n: int, k: int, m: int = 1, *, gate_up: bool = False,
              splits: int | None = None) -> GemvPlan:
    """Choose the variant and split-K factor for ``n`` outputs of length-``k`` rows, ``m`` tokens.

    ``splits=None`` picks the fewest splits whose x slice fits in shared memory.
    """
    check_positive(n=n, k=k, m=m)
    if m > MAX_M:
        raise ValueError(f"gemv takes at most {MAX_M} tokens (m={m}); use gemm for prefill")
    vec = 8 if k % 8 == 0 else 1
    nchunks = k // vec
    fit = ceil_div(m * k * 4, SMEM_LIMIT)  # splits needed for the x slice to fit
    if splits is None:
        # Measured on the H100 (scripts/sweep_gemv.py, every decode shape of the 1B and 8B
        # models): each extra split cost more than the parallelism it bought, so split only
        # as far as the x slice must to fit in shared memory.
        splits = fit
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    splits = min(splits, nchunks)
    cps = ceil_div(nchunks, splits)
    splits = ceil_div(nchunks, cps)  # no empty trailing split
    shared = m * cps * vec * 4
    if shared > SMEM_LIMIT:
        raise ValueError(f"gemv: splits={splits} leaves {shared} bytes of x per block (limit {SMEM_LIMIT}); "
                         f"use at least {fit} splits")
    mmax = 1 << (m - 1).bit_length()
    rows = n * (2 if gate_up else 1)
    ws = 0 if splits == 1 else splits * m * rows * 4 + n * 4
    return GemvPlan(m, n, k, gate_up, mmax, vec, splits, cps, shared, ws)


BLOCKS_ENV = "NEXUSRT_GEMV_BLOCKS_PER_SM"
SLIM_ENV = "NEXUSRT_GEMV_SLIM"


def kernel_name(plan: GemvPlan, slim: bool | None = None) -> str:
    """The entry point for ``plan``: its own, or the ``_slim`` one where ``slim`` (None: as
    ``NEXUSRT_GEMV_SLIM=1`` says) asks for it and it exists (one token, 16-byte loads)."""
    if slim is None:
        slim = env_int(SLIM_ENV, 0, 1) == 1
    if slim and plan.mmax == 1 and plan.vec == 8:
        return plan.kernel_name + "_slim"
    return plan.kernel_name


def blocks_cap() -> int | None:
    """``NEXUSRT_GEMV_BLOCKS_PER_SM=<n>``: at most n blocks of each decode GEMV per SM (unset: as
    many as fit). For comparisons: with fewer, the next kernel's blocks find room beside them and
    issue their first weight loads while this one runs (programmatic dependent launch)."""
    return env_int(BLOCKS_ENV, 1)


def resident_grid(rt, kernel, shared: int, tasks: int, splits: int = 1) -> int:
    """grid.x of a persistent GEMV: every resident block (at most ``blocks_cap()`` per SM), no
    more than the tasks need. Opts the kernel in to ``shared`` bytes first: 48 KB counts the
    kernel's static shared memory too, so 48 KB of dynamic alone already needs it (a no-op once
    the kernel's limit is that high)."""
    kernel.set_max_dynamic_shared(shared, rt.device.handle)
    per_sm = blocks_per_sm(kernel, THREADS, shared)
    cap = blocks_cap()
    if cap is not None:
        per_sm = min(per_sm, cap)
    return max(1, min(ceil_div(tasks, WARPS), per_sm * sm_count(rt) // splits))


def gemv(rt, y, w, x, *, n: int, k: int, m: int = 1, bias=None, bias_dtype: str | None = None,
         residual=None, norm_weight=None, eps: float = 1e-5, gate_up: bool = False,
         workspace=None, splits: int | None = None, ring: bool | None = None,
         slim: bool | None = None) -> LaunchSpec:
    """Launch spec for ``y = W . x`` with the optional epilogues (see the module docstring).

    ``y`` fp32 [m, n]; ``w`` bf16 [n, k] ([2n, k] with ``gate_up``); ``x`` fp32 [m, k];
    ``bias`` bf16/fp32 [n] ([2n] with gate_up); ``residual`` fp32 [m, n] (may be ``y``);
    ``norm_weight`` fp32 [k]; ``workspace`` (zeroed, ``plan.workspace_bytes``) when the plan splits K.
    ``ring``: True takes the bulk-copy ring kernel where it applies, False never, None as
    ``NEXUSRT_GEMV_RING`` says (gemv_ring.py; same bits either way). ``slim``: the same for the
    ``_slim`` register entries and ``NEXUSRT_GEMV_SLIM`` (:func:`kernel_name`), where no ring is taken.
    """
    plan = plan_gemv(n, k, m, gate_up=gate_up, splits=splits)
    rows = plan.rows
    check_tensor(y, "y", (m, n), "fp32")
    check_tensor(w, "w", (rows, k), "bf16")
    check_tensor(x, "x", (m, k), "fp32")
    flags = epilogue_flags(m=m, n=n, k=k, rows=rows, bias=bias, bias_dtype=bias_dtype, residual=residual,
                           norm_weight=norm_weight)
    if plan.vec == 8:
        for t, name in ((w, "w"), (x, "x"), (norm_weight, "norm_weight")):
            if t is not None:
                check_aligned(t, name, 16)
    ws_ptr = cnt_ptr = 0
    if plan.splits > 1:
        if workspace is None:
            raise ValueError(f"gemv {n}x{k} (m={m}) splits K {plan.splits} ways and needs a zeroed "
                             f"workspace of {plan.workspace_bytes} bytes (plan_gemv(...).workspace_bytes)")
        nbytes = getattr(workspace, "nbytes", None)
        if nbytes is not None and nbytes < plan.workspace_bytes:
            raise ValueError(f"workspace has {nbytes} bytes, gemv needs {plan.workspace_bytes}")
        ws_ptr = ptr(workspace)
        cnt_ptr = ws_ptr + plan.counters_offset
    stages = gemv_ring.stages_for(rt, k, ring) if (m == 1 and plan.splits == 1) else None
    if stages is not None:  # the bulk-copy ring (gemv_ring.py): same bits, weights land in shared memory
        kernel = rt.kernels.get(gemv_ring.SOURCE, f"gemv_ring_{'gateup' if gate_up else 'rows'}",
                                RING_SIGNATURE)
        shared = gemv_ring.shared_bytes(k, stages)
        grid_x = resident_grid(rt, kernel, shared, n)
        args = kernel.pack(ptr(y), ptr(w), ptr(x), ptr(bias), ptr(residual), ptr(norm_weight), float(eps), n, k,
                           flags, stages)
        return LaunchSpec(kernel, (grid_x, 1, 1), (THREADS, 1, 1), args, shared,
                          name=f"{kernel.name}[{n}x{k}]", pdl=pdl_ok(rt))
    name = kernel_name(plan, slim)
    kernel = rt.kernels.get(SOURCE, name, SIGNATURE)
    grid_x = resident_grid(rt, kernel, plan.shared, n, plan.splits)
    args = kernel.pack(ptr(y), ptr(w), ptr(x), ptr(bias), ptr(residual), ptr(norm_weight),
                       float(eps), m, n, k, ws_ptr, cnt_ptr, flags)
    return LaunchSpec(kernel, (grid_x, plan.splits, 1), (THREADS, 1, 1), args, plan.shared,
                      name=f"{name}[{n}x{k}]", pdl=pdl_ok(rt))


def gemv_bytes(n: int, k: int, m: int = 1, *, gate_up: bool = False, residual: bool = False,
               norm: bool = False) -> int:
    """The fewest bytes a GEMV must move through DRAM: W once, x, y (and residual/norm weight)."""
    rows = n * (2 if gate_up else 1)
    return rows * k * 2 + m * k * 4 + m * n * 4 * (2 if residual else 1) + (k * 4 if norm else 0)


def decode_shapes(config) -> list[tuple[str, int, int, dict]]:
    """The GEMVs of one decode step: (name, n, k, epilogue kwargs) as the runner fuses them."""
    h = config.hidden_size
    d = config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    return [
        ("qkv", qkv, h, {"norm": True}),
        ("o", h, config.num_attention_heads * d, {"residual": True}),
        ("gate_up", config.intermediate_size, h, {"norm": True, "gate_up": True}),
        ("down", h, config.intermediate_size, {"residual": True}),
        ("lm_head", config.vocab_size, h, {"norm": True}),
    ]


def bench_cases(rt, config, splits: int | None = None, only: str | None = None,
                m: int = 1) -> list[BenchCase]:
    """Every decode GEMV of ``config`` at ``m`` tokens (1 for the kernels stage), weights rotated
    so the L2 never holds them.

    ``splits`` forces a split-K factor, ``only`` one shape by name and ``m`` the token count
    (scripts/sweep_gemv.py; m = 2..8 are the batched decode's ``gemv_m{2,4,8}`` variants).
    """
    from . import bench_util

    cases = []
    for name, n, k, opts in decode_shapes(config):
        if only is not None and name != only:
            continue
        gate_up = opts.get("gate_up", False)
        plan = plan_gemv(n, k, m, gate_up=gate_up, splits=splits)
        weights = bench_util.random_weights(rt, (plan.rows, k))
        x = bench_util.random_f32(rt, (m, k), seed=1)
        y = bench_util.random_f32(rt, (m, n), seed=2)
        norm_w = bench_util.random_f32(rt, (k,), seed=3, offset=1.0) if opts.get("norm") else None
        ws = bench_util.zeros(rt, plan.workspace_bytes) if plan.splits > 1 else None
        nbytes = gemv_bytes(n, k, m, gate_up=gate_up, residual=opts.get("residual", False),
                            norm=opts.get("norm", False))
        label = f"gemv {name} {plan.rows}x{k}" + (f" m={m}" if m != 1 else "")
        seen = set()
        # The kernel the decode step takes, then each other kind where it applies.
        for tag, ring, slim in (("", None, None), (" (ring)", True, False), (" (registers)", False, False),
                                (" (slim)", False, True)):
            specs = [gemv(rt, y, w, x, n=n, k=k, m=m, gate_up=gate_up, norm_weight=norm_w,
                          residual=y if opts.get("residual") else None, workspace=ws, splits=plan.splits,
                          ring=ring, slim=slim) for w in weights]
            kernel = specs[0].kernel.name
            if kernel in seen:
                continue
            keep = () if seen else (weights, x, y, norm_w, ws)  # shared by the shape's cases: freed once
            seen.add(kernel)
            cases.append(BenchCase(
                name=label + tag, bytes_moved=nbytes,
                launch=bench_util.rotate(specs), group="gemv",
                notes={"splits": plan.splits, "copies": len(weights), "kernel": kernel, "_keep": keep}))
    return cases
