"""kv_compact kernel (KV pruning's compaction): NVRTC builds and launcher checks on the CPU; on a
GPU, the kernel against ``kvcache.blocks.compact_tokens`` on random pools, bit for bit. The GPU
tests use no torch, so compute-sanitizer runs them quickly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import kv_compact as kvc
from nexusrt.kvcache.blocks import BLOCK_SIZE, compact_tokens, pool_shape

from fakes import FakeRuntime, tensor


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_every_kernel_the_launcher_names(arch):
    cubin = compile_file("kv_compact", arch, use_cache=False).cubin
    for d in kvc.HEAD_DIMS:
        assert f"kv_compact_d{d}".encode() in cubin


def _args(layers=3, width=6, count=40):
    return dict(pools=tensor((2 * layers,), "int64", 0x100), table=tensor((width,), "int32", 0x200),
                keep=tensor((width * BLOCK_SIZE,), "int32", 0x300))


def test_the_launcher_names_the_kernel_grid_and_arguments():
    rt = FakeRuntime()
    spec = kvc.kv_compact(rt, **_args(), count=40, first=4, num_layers=3, num_kv_heads=2, head_dim=128)
    assert rt.asked == [("kv_compact", "kv_compact_d128", kvc.SIGNATURE)]
    assert spec.grid == (2, 6, 1) and spec.block == (kvc.THREADS, 1, 1) and spec.shared == 0 and not spec.pdl
    assert spec.args == (0x100, 0x200, 0x300, 40, 4, 2)


BAD = [
    (dict(head_dim=96), "head_dim in"),
    (dict(count=0), "count must be a positive int"),
    (dict(first=40), r"first must be an int in 0\.\.count-1"),
    (dict(first=-1), "first must be"),
    (dict(first=True), "first must be"),
    (dict(num_layers=4), r"pools has shape \(6,\), expected \(8,\)"),
    (dict(pools=tensor((6,), "int32", 0x100)), "pools has dtype int32, expected int64"),
    (dict(table=tensor((2, 3), "int32", 0x200)), "table must be a 1-d"),
    (dict(table=tensor((6,), "int64", 0x200)), "table has dtype int64"),
    (dict(count=97), "cannot lie inside a table of 6 blocks"),
    (dict(keep=tensor((39,), "int32", 0x300)), "at least count=40"),
    (dict(keep=tensor((96,), "fp32", 0x300)), "keep has dtype fp32"),
    (dict(table=0), "table is a null device address"),
]


@pytest.mark.parametrize("bad, match", BAD, ids=[m for _, m in BAD])
def test_the_launcher_refuses_what_the_kernel_cannot_take(bad, match):
    kw = _args() | dict(count=40, first=4, num_layers=3, num_kv_heads=2, head_dim=128) | bad
    with pytest.raises(ValueError, match=match):
        kvc.kv_compact(FakeRuntime(), **kw)


def test_pool_addresses_interleave_each_layers_k_and_v_and_check_every_pool():
    shape = pool_shape(9, 2, 64)
    ks = [tensor(shape, "bf16", 0x1000 * (i + 1)) for i in range(3)]
    vs = [tensor(shape, "bf16", 0x100000 * (i + 1)) for i in range(3)]
    got = kvc.pool_addresses(ks, vs, 2, 64)
    assert got.dtype == np.int64 and got.tolist() == [0x1000, 0x100000, 0x2000, 0x200000, 0x3000, 0x300000]
    with pytest.raises(ValueError, match="one K and one V pool per layer"):
        kvc.pool_addresses(ks, vs[:2], 2, 64)
    with pytest.raises(ValueError, match="one K and one V pool per layer"):
        kvc.pool_addresses([], [], 2, 64)
    with pytest.raises(ValueError, match="v_pool has dtype fp32"):
        kvc.pool_addresses(ks, vs[:2] + [tensor(shape, "fp32")], 2, 64)
    with pytest.raises(ValueError, match="k_pool has shape"):
        kvc.pool_addresses(ks, vs, 4, 64)
    other = tensor(pool_shape(10, 2, 64), "bf16")
    with pytest.raises(ValueError, match=r"different block counts \[9, 10\]"):
        kvc.pool_addresses(ks[:2] + [other], vs[:2] + [other], 2, 64)


# ------------------------------------------------------------------------ GPU
BF16 = ml_dtypes.bfloat16


def keep_cases(rng, slots: int) -> dict[str, np.ndarray]:
    """Kept slots of a sequence holding ``slots`` tokens (ascending): the shapes the engine makes and
    the edges. ``slots`` > 3 blocks, so the sets cross blocks and the kernel's tiles."""
    sinks, window = 4, slots // 2
    return {
        "sink-window shift by one": np.r_[0:sinks, sinks + 1:slots],  # every slot moves onto the one before it
        "sink-window, half evicted": np.r_[0:sinks, slots - window:slots],
        "sink-window after a chunk": np.r_[0:sinks, slots - 20:slots],
        "random subset": np.sort(rng.choice(slots, slots // 3, replace=False)),
        "no sinks, crossing blocks": np.arange(BLOCK_SIZE - 3, slots, 2),
        "all": np.arange(slots),
        "one": np.array([slots - 7]),
        "one, slot 0": np.array([0]),
    }


def _run_kernel(rt, k_np, v_np, table, keep, first):
    """Launch kv_compact on device copies of ``k_np``/``v_np`` (lists of bf16 pools); their contents after."""
    import nexusrt as nrt

    ks = [nrt.memory.from_numpy(k) for k in k_np]
    vs = [nrt.memory.from_numpy(v) for v in v_np]
    _, hkv, _, d = k_np[0].shape
    pools = nrt.memory.from_numpy(kvc.pool_addresses(ks, vs, hkv, d))
    table_d = nrt.memory.from_numpy(np.asarray(table, np.int32))
    keep_d = nrt.memory.from_numpy(np.asarray(keep, np.int32))
    kvc.kv_compact(rt, pools, table_d, keep_d, count=len(keep), first=first, num_layers=len(ks), num_kv_heads=hkv,
                   head_dim=d).launch()
    out = [t.to_numpy() for t in ks], [t.to_numpy() for t in vs]
    for t in ks + vs + [pools, table_d, keep_d]:
        t.free()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("d, hkv, layers", [(64, 2, 3), (128, 8, 2), (256, 1, 2)])
def test_kv_compact_equals_compact_tokens_bit_for_bit(gpu_rt, d, hkv, layers):
    rng = np.random.default_rng(d + hkv)
    num_blocks, table_blocks = 40, 27  # a sequence of 27 scattered blocks in a pool of 40
    slots = table_blocks * BLOCK_SIZE - 5  # the last block partly filled
    for name, keep in keep_cases(rng, slots).items():
        table = rng.permutation(num_blocks)[:table_blocks]
        # Fresh random bits per case, never zeros: every slot (and every block outside the table) differs.
        k_np = [rng.standard_normal(pool_shape(num_blocks, hkv, d)).astype(BF16) for _ in range(layers)]
        v_np = [rng.standard_normal(pool_shape(num_blocks, hkv, d)).astype(BF16) for _ in range(layers)]
        want = [p.copy() for p in k_np + v_np]
        for p in want:
            compact_tokens(p, table, keep)
        moved = np.flatnonzero(keep != np.arange(len(keep)))
        firsts = {0, int(moved[0]) if len(moved) else 0}  # the runner's first, and 0 (every slot rewritten)
        for first in sorted(firsts):
            k_got, v_got = _run_kernel(gpu_rt, k_np, v_np, table, keep, first)
            for i, (got, w) in enumerate(zip(k_got + v_got, want)):
                bad = np.argwhere(got.view(np.uint16) != w.view(np.uint16))
                assert not len(bad), f"{name} (first={first}): pool {i} differs at {bad[:3].tolist()}"


@pytest.mark.gpu
def test_the_compactor_stages_each_call_apart_and_skips_a_keep_that_moves_nothing(gpu_rt):
    """Many compactions in a row on the runner's stream, more than the staging rows (so it waits
    for the stream once), each of another sequence: each equals compact_tokens on its own blocks."""
    import nexusrt as nrt
    from types import SimpleNamespace

    from nexusrt.backends.cuda.compact import Compactor
    from nexusrt.driver.calls import call

    rng = np.random.default_rng(3)
    hkv, d, layers, num_blocks, width = 2, 128, 2, 64, 8
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=hkv, head_dim=d)
    k_np = [rng.standard_normal(pool_shape(num_blocks + 1, hkv, d)).astype(BF16) for _ in range(layers)]
    v_np = [rng.standard_normal(pool_shape(num_blocks + 1, hkv, d)).astype(BF16) for _ in range(layers)]
    ks = [nrt.memory.from_numpy(k) for k in k_np]
    vs = [nrt.memory.from_numpy(v) for v in v_np]
    stream = gpu_rt.streams["compute"]
    comp = Compactor(gpu_rt, cfg, ks, vs, num_blocks=num_blocks, width=width, scratch=num_blocks, rows=2,
                     stream=stream, h2d=lambda dst, src, n: call("cuMemcpyHtoDAsync", dst.ptr, src, n, stream.handle))
    try:
        want = [p.copy() for p in k_np + v_np]
        perm = rng.permutation(num_blocks)
        for s in range(7):  # seven sequences with disjoint tables of 8 blocks
            table = perm[s * 8:(s + 1) * 8].tolist()
            slots = 8 * BLOCK_SIZE - s
            keep = np.arange(slots) if s == 3 else np.r_[0:4, slots - 40 - s:slots]
            comp.run(table, keep)
            for p in want:
                compact_tokens(p, table, keep)
        stream.synchronize()
        for i, (t, w) in enumerate(zip(ks + vs, want)):
            assert np.array_equal(t.to_numpy().view(np.uint16), w.view(np.uint16)), f"pool {i}"
    finally:
        comp.free()
        for t in ks + vs:
            t.free()
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0
