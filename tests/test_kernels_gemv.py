"""Decode GEMV: the split-K planner on the CPU, the kernel against the NumPy oracle on the GPU."""

from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.ops.common import FLAG_NORM, FLAG_RESIDUAL
from nexusrt.kernels.ops.gemv import SMEM_LIMIT, decode_shapes, gemv, gemv_bytes, plan_gemv
from nexusrt.reference.ops import linear_epilogue, rel_error

from fakes import FakeRuntime

BF16 = ml_dtypes.bfloat16
FAKE_RT = FakeRuntime()

LLAMA_1B = SimpleNamespace(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, vocab_size=128256)
LLAMA_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=128256)


# -- planner (CPU) ------------------------------------------------------------------------------
def test_decode_shapes_are_the_issue_shapes():
    got = {name: (n, k) for name, n, k, _ in decode_shapes(LLAMA_1B)}
    assert got == {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (8192, 2048),
                   "down": (2048, 8192), "lm_head": (128256, 2048)}
    got8 = {name: (n, k) for name, n, k, _ in decode_shapes(LLAMA_8B)}
    assert got8["qkv"] == (6144, 4096) and got8["down"] == (4096, 14336) and got8["gate_up"] == (14336, 4096)


def test_plan_large_n_does_not_split():
    for n, k in [(3072, 2048), (128256, 4096), (6144, 4096)]:
        p = plan_gemv(n, k)
        assert p.splits == 1 and p.workspace_bytes == 0 and p.vec == 8
        assert p.kernel_name == "gemv_m1_rows_v8"


def test_plan_splits_only_as_far_as_shared_memory_needs():
    # Measured on the H100 (scripts/sweep_gemv.py): every extra split was slower.
    assert plan_gemv(2048, 8192).splits == 1  # 1B down: 32 KB of x fits
    assert plan_gemv(2048, 8192).workspace_bytes == 0
    assert plan_gemv(2048, 2048).splits == 1
    forced = plan_gemv(2048, 8192, splits=2)
    assert forced.chunks_per_split == 512 and forced.workspace_bytes == 2 * 2048 * 4 + 2048 * 4


def test_plan_splits_when_x_does_not_fit_shared_memory():
    p = plan_gemv(4096, 14336)  # 8B down: 57 KB of x, over 48 KB (the launch opts in), unsplit
    assert p.splits == 1 and p.shared == 14336 * 4 > 48 * 1024
    p8 = plan_gemv(4096, 14336, m=8)  # 448 KB of x: five slices of <= 96 KB
    assert p8.shared <= SMEM_LIMIT and p8.splits == 5 and p8.mmax == 8


def test_launch_opts_in_to_its_shared_memory(monkeypatch):
    from fakes import FakeKernel, tensor
    from nexusrt.kernels.ops import gemv as gv

    kernel = FakeKernel()
    rt = FakeRuntime(kernel=kernel)
    monkeypatch.setattr(gv, "blocks_per_sm", lambda kernel, threads, shared: 2)
    spec = gemv(rt, tensor((1, 4096), "fp32"), tensor((4096, 14336), "bf16"), tensor((1, 14336), "fp32"),
                n=4096, k=14336, residual=tensor((1, 4096), "fp32"))
    assert spec.grid == (264, 1, 1) and spec.shared == 14336 * 4 and kernel.shared == 14336 * 4
    # 48 KB of dynamic shared memory plus the kernel's static bytes is over 48 KB: opted in too.
    small = FakeKernel()
    spec = gemv(FakeRuntime(kernel=small), tensor((3, 300), "fp32"), tensor((600, 4096), "bf16"),
                tensor((3, 4096), "fp32"), n=300, k=4096, m=3, norm_weight=tensor((4096,), "fp32"), gate_up=True)
    assert spec.grid == (38, 1, 1) and spec.shared == 49152 and small.shared == 49152
    assert spec.args[-1] == FLAG_NORM


def test_blocks_per_sm_cap_from_the_environment(monkeypatch):
    from fakes import tensor
    from nexusrt.kernels.ops import gemv as gv

    monkeypatch.setattr(gv, "blocks_per_sm", lambda kernel, threads, shared: 2)
    args = (tensor((1, 4096), "fp32"), tensor((4096, 4096), "bf16"), tensor((1, 4096), "fp32"))
    monkeypatch.delenv(gv.BLOCKS_ENV, raising=False)
    assert gemv(FakeRuntime(), *args, n=4096, k=4096).grid == (264, 1, 1)
    monkeypatch.setenv(gv.BLOCKS_ENV, "1")
    assert gemv(FakeRuntime(), *args, n=4096, k=4096).grid == (132, 1, 1)
    monkeypatch.setenv(gv.BLOCKS_ENV, "3")  # a cap above what fits changes nothing
    assert gemv(FakeRuntime(), *args, n=4096, k=4096).grid == (264, 1, 1)
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(gv.BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match=gv.BLOCKS_ENV):
            gemv(FakeRuntime(), *args, n=4096, k=4096)


def test_slim_entries_from_the_environment(monkeypatch):
    from fakes import tensor
    from nexusrt.kernels.ops import gemv as gv

    monkeypatch.setattr(gv, "blocks_per_sm", lambda kernel, threads, shared: 3)
    monkeypatch.delenv(gv.BLOCKS_ENV, raising=False)
    one = (tensor((1, 4096), "fp32"), tensor((4096, 4096), "bf16"), tensor((1, 4096), "fp32"))
    gate_up = (tensor((1, 4096), "fp32"), tensor((8192, 4096), "bf16"), tensor((1, 4096), "fp32"))
    monkeypatch.delenv(gv.SLIM_ENV, raising=False)
    assert gemv(FakeRuntime(), *one, n=4096, k=4096).kernel.name == "gemv_m1_rows_v8"
    monkeypatch.setenv(gv.SLIM_ENV, "1")
    spec = gemv(FakeRuntime(), *one, n=4096, k=4096)
    assert spec.kernel.name == "gemv_m1_rows_v8_slim" and spec.grid == (396, 1, 1)
    assert spec.name == "gemv_m1_rows_v8_slim[4096x4096]"
    assert gemv(FakeRuntime(), *gate_up, n=4096, k=4096, gate_up=True).kernel.name == "gemv_m1_gateup_v8_slim"
    monkeypatch.setenv(gv.BLOCKS_ENV, "2")  # two of the GEMV, the third slot left to the next kernel
    assert gemv(FakeRuntime(), *one, n=4096, k=4096).grid == (264, 1, 1)
    # Not taken: several tokens (gemv_m4), scalar loads (K % 8 != 0).
    three = (tensor((3, 4096), "fp32"), one[1], tensor((3, 4096), "fp32"))
    assert gemv(FakeRuntime(), *three, n=4096, k=4096, m=3).kernel.name == "gemv_m4_rows_v8"
    ragged = (one[0], tensor((4096, 4100), "bf16"), tensor((1, 4100), "fp32"))
    assert gemv(FakeRuntime(), *ragged, n=4096, k=4100).kernel.name == "gemv_m1_rows_v1"
    monkeypatch.setenv(gv.SLIM_ENV, "0")
    assert gemv(FakeRuntime(), *one, n=4096, k=4096).kernel.name == "gemv_m1_rows_v8"
    assert gemv(FakeRuntime(), *one, n=4096, k=4096, slim=True).kernel.name == "gemv_m1_rows_v8_slim"
    monkeypatch.setenv(gv.SLIM_ENV, "1")
    assert gemv(FakeRuntime(), *one, n=4096, k=4096, slim=False).kernel.name == "gemv_m1_rows_v8"
    for bad in ("2", "yes"):
        monkeypatch.setenv(gv.SLIM_ENV, bad)
        with pytest.raises(ValueError, match=gv.SLIM_ENV):
            gemv(FakeRuntime(), *one, n=4096, k=4096)


def _hopper(sm_count=132):
    rt = FakeRuntime(sm_count=sm_count)
    rt.profile.compute_capability = (9, 0)
    rt.profile.shared_memory_per_block_optin = 227 * 1024
    return rt


def test_ring_stages_fill_the_block_and_respect_the_switches(monkeypatch):
    from nexusrt.kernels.ops import gemv_ring

    monkeypatch.delenv(gemv_ring.ENV, raising=False)
    monkeypatch.delenv(gemv_ring.STAGES_ENV, raising=False)
    rt = _hopper()
    assert gemv_ring.stages_for(rt, 4096) is None  # off unless asked for
    # (227 KB - 1 KB - x) // (8 warps x (4 KB + 8)): the 8B's K = 4096 and 14336, the 1B's 2048.
    assert [gemv_ring.stages_for(rt, k, True) for k in (4096, 14336, 2048)] == [6, 5, 6]
    for k in (4096, 14336):
        assert gemv_ring.shared_bytes(k, gemv_ring.stages_for(rt, k, True)) <= 227 * 1024 - 1024
    assert gemv_ring.stages_for(rt, 4100, True) is None  # K % 8
    assert gemv_ring.stages_for(rt, 45000, True) is None  # x leaves room for fewer than two slots a warp
    assert gemv_ring.stages_for(FakeRuntime(), 4096, True) is None  # no compute capability: not sm_90
    monkeypatch.setenv(gemv_ring.ENV, "1")
    assert gemv_ring.stages_for(rt, 4096) == 6 and gemv_ring.stages_for(rt, 4096, False) is None
    monkeypatch.setenv(gemv_ring.STAGES_ENV, "3")
    assert gemv_ring.stages_for(rt, 4096) == 3
    for bad in ("1", "9", "two"):
        monkeypatch.setenv(gemv_ring.STAGES_ENV, bad)
        with pytest.raises(ValueError, match=gemv_ring.STAGES_ENV):
            gemv_ring.stages_for(rt, 4096)
    monkeypatch.delenv(gemv_ring.STAGES_ENV)
    monkeypatch.setenv(gemv_ring.ENV, "0")
    assert gemv_ring.stages_for(rt, 4096) is None
    monkeypatch.setenv(gemv_ring.ENV, "yes")
    with pytest.raises(ValueError, match=gemv_ring.ENV):
        gemv_ring.stages_for(rt, 4096)


def test_ring_launch_on_sm90(monkeypatch):
    from fakes import tensor
    from nexusrt.kernels.ops import gemv as gv
    from nexusrt.kernels.ops import gemv_ring

    monkeypatch.delenv(gemv_ring.ENV, raising=False)
    monkeypatch.delenv(gemv_ring.STAGES_ENV, raising=False)
    monkeypatch.setattr(gv, "blocks_per_sm", lambda kernel, threads, shared: 1)
    rt = _hopper()
    y, x = tensor((1, 4096), "fp32"), tensor((1, 14336), "fp32")
    assert gemv(rt, y, tensor((4096, 14336), "bf16"), x, n=4096, k=14336).kernel.name == "gemv_m1_rows_v8"
    monkeypatch.setenv(gemv_ring.ENV, "1")
    spec = gemv(rt, y, tensor((4096, 14336), "bf16"), x, n=4096, k=14336, residual=y)
    assert spec.kernel.name == "gemv_ring_rows" and spec.grid == (132, 1, 1) and spec.block == (256, 1, 1)
    assert spec.shared == gemv_ring.shared_bytes(14336, 5) and spec.kernel.shared == spec.shared
    assert list(spec.args)[-4:] == [4096, 14336, FLAG_RESIDUAL, 5]  # n, k, flags, stages
    up = gemv(rt, tensor((1, 14336), "fp32"), tensor((28672, 4096), "bf16"), tensor((1, 4096), "fp32"), n=14336,
              k=4096, gate_up=True, norm_weight=tensor((4096,), "fp32"))
    assert up.kernel.name == "gemv_ring_gateup" and list(up.args)[-2:] == [FLAG_NORM, 6]
    # Not taken: several tokens, a forced split, ring=False, and a device before sm_90.
    assert gemv(rt, tensor((2, 4096), "fp32"), tensor((4096, 4096), "bf16"), tensor((2, 4096), "fp32"), n=4096,
                k=4096, m=2).kernel.name == "gemv_m2_rows_v8"
    assert gemv(rt, y, tensor((4096, 4096), "bf16"), tensor((1, 4096), "fp32"), n=4096, k=4096, splits=2,
                workspace=tensor((plan_gemv(4096, 4096, splits=2).workspace_bytes,), "uint8")
                ).kernel.name == "gemv_m1_rows_v8"
    assert gemv(rt, y, tensor((4096, 4096), "bf16"), tensor((1, 4096), "fp32"), n=4096, k=4096,
                ring=False).kernel.name == "gemv_m1_rows_v8"
    assert gemv(FakeRuntime(), y, tensor((4096, 4096), "bf16"), tensor((1, 4096), "fp32"), n=4096,
                k=4096).kernel.name == "gemv_m1_rows_v8"


def test_plan_variants_and_ragged_k():
    assert plan_gemv(100, 36).vec == 1  # K % 8 != 0: rows are not 16-byte aligned
    assert plan_gemv(100, 40, m=3).mmax == 4
    assert plan_gemv(8192, 2048, gate_up=True).kernel_name == "gemv_m1_gateup_v8"
    assert plan_gemv(8192, 2048, gate_up=True).rows == 16384
    p = plan_gemv(10, 64, splits=50)  # more splits than chunks: clamped, none empty
    assert p.splits == 8 and p.chunks_per_split == 1


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="at most 8 tokens"):
        plan_gemv(10, 64, m=9)
    with pytest.raises(ValueError, match="k must be a positive int"):
        plan_gemv(10, 0)
    with pytest.raises(ValueError, match="splits"):
        plan_gemv(10, 64, splits=0)
    with pytest.raises(ValueError, match="at least"):
        plan_gemv(10, 40000, splits=1)


def test_launcher_checks_shapes_before_touching_the_device():
    y = SimpleNamespace(ptr=256, shape=(1, 64), dtype="fp32")
    w = SimpleNamespace(ptr=512, shape=(64, 128), dtype="bf16")
    x = SimpleNamespace(ptr=1024, shape=(1, 100), dtype="fp32")
    with pytest.raises(ValueError, match="x has shape"):
        gemv(FAKE_RT, y, w, x, n=64, k=128)
    x = SimpleNamespace(ptr=1024, shape=(1, 128), dtype="bf16")
    with pytest.raises(ValueError, match="x has dtype bf16, expected fp32"):
        gemv(FAKE_RT, y, w, x, n=64, k=128)
    x = SimpleNamespace(ptr=1028, shape=(1, 128), dtype="fp32")
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        gemv(FAKE_RT, y, w, x, n=64, k=128)
    x = SimpleNamespace(ptr=1024, shape=(1, 128), dtype="fp32")
    with pytest.raises(ValueError, match="bias must be bf16 or fp32"):
        gemv(FAKE_RT, y, w, x, n=64, k=128, bias=4096)
    with pytest.raises(ValueError, match="workspace"):
        gemv(FAKE_RT, y, w, x, n=64, k=128, splits=2)


def test_gemv_bytes_counts_weights_once():
    assert gemv_bytes(2048, 2048) == 2048 * 2048 * 2 + 2048 * 4 + 2048 * 4
    assert gemv_bytes(8192, 2048, gate_up=True, norm=True) == 16384 * 2048 * 2 + 2048 * 4 + 8192 * 4 + 2048 * 4



def test_bench_cases_at_m8_build_on_the_cpu(cpu_rt, monkeypatch):
    """scripts/sweep_gemv.py --m 8: the batched variants' cases pass the launcher's checks
    (x and y are [m, ...], the plan splits K where 8 rows of x overflow shared memory)."""
    import nexusrt as nrt
    from nexusrt.kernels.ops import bench_util
    from nexusrt.kernels.ops import gemv as gv

    monkeypatch.setattr(bench_util, "random_weights", lambda rt, shape: [nrt.memory.empty(shape, "bf16")])
    monkeypatch.setattr(gv, "blocks_per_sm", lambda kernel, threads, shared: 2)
    cases = gv.bench_cases(FakeRuntime(), LLAMA_8B, m=8)
    one = gv.bench_cases(FakeRuntime(), LLAMA_8B, only="o")  # m=1, as the kernels stage builds it
    try:
        assert [c.name for c in cases] == ["gemv qkv 6144x4096 m=8", "gemv o 4096x4096 m=8",
                                           "gemv gate_up 28672x4096 m=8", "gemv down 4096x14336 m=8",
                                           "gemv lm_head 128256x4096 m=8"]
        assert [c.notes["kernel"] for c in cases] == ["gemv_m8_rows_v8"] * 2 + ["gemv_m8_gateup_v8"] + \
            ["gemv_m8_rows_v8"] * 2
        assert [c.notes["splits"] for c in cases] == [2, 2, 2, 5, 2]  # 8 * K * 4 bytes of x over 96 KB
        assert cases[2].bytes_moved == gemv_bytes(14336, 4096, 8, gate_up=True, norm=True)
        assert [(c.name, c.notes["kernel"]) for c in one] == [("gemv o 4096x4096", "gemv_m1_rows_v8"),
                                                               ("gemv o 4096x4096 (slim)", "gemv_m1_rows_v8_slim")]
    finally:
        for c in cases + one:
            for t in c.notes["_keep"]:
                for u in (t if isinstance(t, list) else [t]):
                    if u is not None:
                        u.free()


# -- kernel (GPU) -------------------------------------------------------------------------------
def _run(rt, w, x, *, splits=None, bias=None, residual=None, in_place=False, norm_weight=None, gate_up=False,
         eps=1e-5, ring=True):
    import nexusrt as nrt

    m, k = x.shape
    n = w.shape[0] // (2 if gate_up else 1)
    keep = []

    def dev(a):
        t = nrt.memory.from_numpy(a)
        keep.append(t)
        return t

    plan = plan_gemv(n, k, m, gate_up=gate_up, splits=splits)
    ws = nrt.memory.zeros((max(4, plan.workspace_bytes),), "uint8") if plan.splits > 1 else None
    y = dev(residual.copy() if in_place else np.full((m, n), np.nan, np.float32))
    spec = gemv(rt, y, dev(w), dev(x), n=n, k=k, m=m, splits=splits, gate_up=gate_up, workspace=ws,
                bias=None if bias is None else dev(bias), norm_weight=None if norm_weight is None else dev(norm_weight),
                residual=y if in_place else (None if residual is None else dev(residual)), eps=eps, ring=ring)
    spec.launch(rt.streams["compute"])
    out = y.to_numpy()
    for t in keep + ([ws] if ws is not None else []):
        t.free()
    return out, plan


def _inputs(n, k, m=1, seed=0, rows=None):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows or n, k), dtype=np.float32) * np.float32(0.05)).astype(BF16)
    x = rng.standard_normal((m, k), dtype=np.float32)
    return w, x


SHAPES = [(1, 8), (7, 24), (37, 200), (33, 100), (13, 7), (5, 1), (1000, 1000), (300, 4104), (65, 2056)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_plain_matches_oracle(gpu_rt, n, k, m):
    w, x = _inputs(n, k, m, seed=n * 31 + k + m)
    out, plan = _run(gpu_rt, w, x)
    assert not np.isnan(out).any()
    assert rel_error(out, linear_epilogue(w, x)) < 2e-5, plan


@pytest.mark.gpu
@pytest.mark.parametrize("model", [LLAMA_1B, LLAMA_8B], ids=["1b", "8b"])
def test_gemv_real_decode_shapes(gpu_rt, model):
    for name, n, k, opts in decode_shapes(model):
        gate_up = opts.get("gate_up", False)
        rng = np.random.default_rng(n + k)
        w, x = _inputs(n, k, rows=2 * n if gate_up else n, seed=n + k)
        norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32) if opts.get("norm") else None
        res = rng.standard_normal((1, n)).astype(np.float32) if opts.get("residual") else None
        out, plan = _run(gpu_rt, w, x, norm_weight=norm_w, residual=res, in_place=res is not None, gate_up=gate_up)
        ref = linear_epilogue(w, x, norm_weight=norm_w, residual=res, gate_up=gate_up)
        assert rel_error(out, ref) < 5e-5, (name, plan)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5])
def test_gemv_epilogues(gpu_rt, m):
    rng = np.random.default_rng(m)
    n, k = 300, 520
    w, x = _inputs(n, k, m, seed=100 + m)
    for bias in (rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(BF16)):
        out, _ = _run(gpu_rt, w, x, bias=bias)
        assert rel_error(out, linear_epilogue(w, x, bias=bias)) < 2e-5
    res = rng.standard_normal((m, n)).astype(np.float32)
    for in_place in (False, True):
        out, _ = _run(gpu_rt, w, x, residual=res, in_place=in_place)
        assert rel_error(out, linear_epilogue(w, x, residual=res)) < 2e-5
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    x_big = x * 7.0  # the norm must really rescale
    out, _ = _run(gpu_rt, w, x_big, norm_weight=norm_w, eps=1e-6)
    assert rel_error(out, linear_epilogue(w, x_big, norm_weight=norm_w, eps=1e-6)) < 2e-5


RING_CASES = [  # n, k: partial last slots (K % 2048), one step a task, fewer tasks than warps, the 8B down
    (300, 520), (1000, 896), (7, 8), (2048, 2048), (4096, 14336), (1111, 4104), (3, 40000)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", RING_CASES)
@pytest.mark.parametrize("stages", [None, "2", "3"])
def test_ring_gives_the_register_kernels_bits(gpu_rt, n, k, stages, monkeypatch):
    from nexusrt.kernels.ops import gemv_ring

    if gemv_ring.stages_for(gpu_rt, k, True) is None and k != 40000:
        pytest.skip("no bulk-copy ring on this device")
    if stages is not None:
        monkeypatch.setenv(gemv_ring.STAGES_ENV, stages)
    rng = np.random.default_rng(n + k)
    w, x = _inputs(n, k, seed=n * 7 + k)
    res = rng.standard_normal((1, n)).astype(np.float32)
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    bias = rng.standard_normal(2 * n).astype(BF16)
    wg, _ = _inputs(n, k, rows=2 * n, seed=n * 5 + k)
    for kw in (dict(residual=res, in_place=True), dict(bias=bias[:n]), dict(norm_weight=norm_w),
               dict(gate_up=True, norm_weight=norm_w, bias=bias)):
        wk = wg if kw.get("gate_up") else w
        ring, _ = _run(gpu_rt, wk, x, ring=True, **kw)
        regs, plan = _run(gpu_rt, wk, x, ring=False, **kw)
        assert not np.isnan(ring).any()
        np.testing.assert_array_equal(ring.view(np.uint32), regs.view(np.uint32), err_msg=str((kw.keys(), plan)))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(96, 512, 1), (77, 1000, 3), (40, 36, 2), (2048, 2048, 1)])
def test_gemv_gate_up_fused(gpu_rt, n, k, m):
    rng = np.random.default_rng(n)
    w, x = _inputs(n, k, m, rows=2 * n, seed=n + 7)
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    bias = rng.standard_normal(2 * n).astype(np.float32)
    out, _ = _run(gpu_rt, w, x, gate_up=True, norm_weight=norm_w, bias=bias)
    assert rel_error(out, linear_epilogue(w, x, gate_up=True, norm_weight=norm_w, bias=bias)) < 3e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m,gate_up", [(100, 4096, 1, False), (64, 3000, 4, False), (50, 1032, 2, True),
                                           (2048, 8192, 1, False)])
def test_gemv_split_k_is_correct_and_deterministic(gpu_rt, n, k, m, gate_up):
    rng = np.random.default_rng(k)
    w, x = _inputs(n, k, m, rows=2 * n if gate_up else n, seed=k + 1)
    res = rng.standard_normal((m, n)).astype(np.float32)
    ref = linear_epilogue(w, x, residual=res, gate_up=gate_up)
    for splits in (3, 7):
        a, plan = _run(gpu_rt, w, x, splits=splits, residual=res, in_place=True, gate_up=gate_up)
        assert plan.splits > 1
        assert rel_error(a, ref) < 2e-5, plan
        b, _ = _run(gpu_rt, w, x, splits=splits, residual=res, in_place=True, gate_up=gate_up)
        assert np.array_equal(a, b), "split-K results differ between identical runs"


@pytest.mark.gpu
def test_gemv_split_k_workspace_is_reusable(gpu_rt):
    """The counters are left at zero, so the same workspace serves many launches (graph replays)."""
    import nexusrt as nrt

    n, k = 64, 4096
    w, x = _inputs(n, k, seed=3)
    plan = plan_gemv(n, k, splits=4)
    ws = nrt.memory.zeros((plan.workspace_bytes,), "uint8")
    tw, tx = nrt.memory.from_numpy(w), nrt.memory.from_numpy(x)
    ty = nrt.memory.from_numpy(np.zeros((1, n), np.float32))
    spec = gemv(gpu_rt, ty, tw, tx, n=n, k=k, splits=4, workspace=ws, residual=ty)
    for _ in range(5):
        spec.launch(gpu_rt.streams["compute"])
    assert rel_error(ty.to_numpy(), 5 * linear_epilogue(w, x)) < 2e-5
    counters = ws.to_numpy()[plan.counters_offset:plan.counters_offset + 4 * n].view(np.int32)
    assert not counters.any()
    for t in (ws, tw, tx, ty):
        t.free()


SLIM_CASES = [(300, 520), (2048, 2048), (4096, 14336), (7, 8), (1111, 4104)]  # incl. the 8B down


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SLIM_CASES)
def test_slim_entries_give_the_default_bits_three_blocks_an_sm(gpu_rt, n, k, monkeypatch):
    from nexusrt.kernels.ops import gemv as gv
    from nexusrt.kernels.ops.common import blocks_per_sm

    monkeypatch.delenv(gv.BLOCKS_ENV, raising=False)
    rng = np.random.default_rng(n + 3 * k)
    w, x = _inputs(n, k, seed=n * 11 + k)
    wg, _ = _inputs(n, k, rows=2 * n, seed=n * 13 + k)
    res = rng.standard_normal((1, n)).astype(np.float32)
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    bias = rng.standard_normal(2 * n).astype(BF16)
    for kw in (dict(residual=res, in_place=True), dict(bias=bias[:n]), dict(norm_weight=norm_w),
               dict(gate_up=True, norm_weight=norm_w, bias=bias)):
        wk = wg if kw.get("gate_up") else w
        monkeypatch.setenv(gv.SLIM_ENV, "1")
        slim, plan = _run(gpu_rt, wk, x, ring=False, **kw)
        kernel = gpu_rt.kernels.get(gv.SOURCE, gv.kernel_name(plan), gv.SIGNATURE)
        assert kernel.name.endswith("_slim") and blocks_per_sm(kernel, gv.THREADS, plan.shared) == 3, plan
        monkeypatch.setenv(gv.SLIM_ENV, "0")
        regs, _ = _run(gpu_rt, wk, x, ring=False, **kw)
        assert not np.isnan(slim).any()
        np.testing.assert_array_equal(slim.view(np.uint32), regs.view(np.uint32), err_msg=str((kw.keys(), plan)))
