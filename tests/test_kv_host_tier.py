"""The host tier end to end: the _host kernels' builds and launchers on the CPU, the budget's
refusals through nrt.LLM and the CLI, and on a GPU: zero-copy host blocks give bit-identical
results to the all-device run (kernels, and every variant of tests/test_cuda_model.py), and the
leak audit is clean after a cancelled request with host blocks."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from nexusrt.errors import BackendUnavailable
from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import attention_decode as dec
from nexusrt.kernels.ops import attention_prefill as pre
from nexusrt.kernels.ops import rope
from nexusrt.kvcache.blocks import blocks_for, pool_shape
from nexusrt.kvcache.tiers import KvBudgetError, block_bytes, place_oldest_on_host

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16


def _host_tensor(shape, pinned=True):
    t = tensor(shape, "bf16", ptr=0x7000)
    t.device, t.pinned = False, pinned
    return t


# ------------------------------------------------------------------------ CPU: always run
def decode_case(hq, hkv, d, seq_len):
    """One decode-attention case on fresh random data (seeded by its shape): ``(blocks, k, v,
    table, q, pos, heads, workspace)``, K/V as bf16 host arrays in a permuted block order."""
    import nexusrt as nrt

    rng = np.random.default_rng(seq_len + d)
    n = blocks_for(seq_len)
    k = rng.standard_normal(pool_shape(n, hkv, d)).astype(BF16)
    v = rng.standard_normal(pool_shape(n, hkv, d)).astype(BF16)
    table = rng.permutation(n).astype(np.int32)
    q = nrt.memory.from_numpy(rng.standard_normal((hq, d), dtype=np.float32))
    pos = nrt.memory.from_numpy(np.array([seq_len - 1], dtype=np.int32))
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    ws = dec.alloc_workspace(hq, hkv, d, dec.choose_splits(hkv, d, hq // hkv, 8192, 132))
    return n, k, v, table, q, pos, heads, ws


def pinned_pools(*arrays):
    """Each bf16 array in pinned host memory (the host tier's pools), as a tuple."""
    import nexusrt as nrt

    pools = []
    for a in arrays:
        t = nrt.memory.pinned(a.shape, "bf16")
        t.copy_from(a)
        pools.append(t)
    return tuple(pools)


def test_every_host_twin_is_built():
    cubins = {s: compile_file(s, "sm_90a").cubin for s in ("attention_decode", "rope", "attention_prefill_mma")}
    names = [dec.kernel_name(d, g, host=True) for d in dec.HEAD_DIMS for g in range(1, 9)]
    names = [("attention_decode", n) for n in set(names)] + \
            [("rope", f"rope_append_host_d{d}") for d in rope.HEAD_DIMS] + \
            [("attention_prefill_mma", pre.mma_kernel_name(d, b) + "_host") for d in pre.HEAD_DIMS
             for b in pre.MMA_SHAPES[d]]
    assert len(names) == 12 + 3 + 7
    for source, name in names:
        assert name.encode() in cubins[source], f"{name} missing from {source}.cu"
    # No rows twins: the batched engine has no host tier.
    assert b"attention_decode_rows_host" not in cubins["attention_decode"]
    assert b"rope_append_rows_host" not in cubins["rope"]
    with pytest.raises(ValueError, match="one-sequence path"):
        dec.kernel_name(128, 4, rows=True, host=True)


def test_launchers_pick_the_host_twins_and_pass_the_host_pools_last():
    hq, hkv, d, blocks = 32, 8, 128, 10
    host = (_host_tensor(pool_shape(4, hkv, d)), _host_tensor(pool_shape(4, hkv, d)))
    ws = dec.DecodeWorkspace(tensor((hkv, 4, 4, d), "fp32"), tensor((hkv, 4, 4, 2), "fp32"),
                             tensor((hkv,), "int32"), 4)
    pool = tensor(pool_shape(blocks, hkv, d), "bf16")
    rt = FakeRuntime()
    spec = dec.attention_decode(rt, tensor((hq, d), "fp32"), tensor((hq * d,), "fp32"), pool, pool,
                                tensor((blocks,), "int32"), tensor((1,), "int32"), ws, num_q_heads=hq,
                                num_kv_heads=hkv, head_dim=d, host_pools=host)
    assert rt.asked[-1][1] == "attention_decode_host_d128_g4" and len(rt.asked[-1][2].split()) == 15
    assert spec.args[-2:] == (0x7000, 0x7000)
    spec = dec.attention_decode(rt, tensor((hq, d), "fp32"), tensor((hq * d,), "fp32"), pool, pool,
                                tensor((blocks,), "int32"), tensor((1,), "int32"), ws, num_q_heads=hq,
                                num_kv_heads=hkv, head_dim=d, host_pools=host, mma=True)
    assert rt.asked[-1][:2] == ("attention_decode_mma", "attention_decode_mma_host_d128_g4")
    assert len(rt.asked[-1][2].split()) == 15 and spec.args[-2:] == (0x7000, 0x7000)
    assert spec.shared == dec.mma_shared_bytes(d)
    spec = pre.attention_prefill(rt, tensor((5, hq, d), "fp32"), tensor((5, hq * d), "bf16"), pool, pool,
                                 tensor((blocks,), "int32"), tensor((1,), "int32"), num_q_heads=hq,
                                 num_kv_heads=hkv, head_dim=d, host_pools=host)
    assert rt.asked[-1][1].endswith("_host") and spec.kernel.pack is not None and len(spec.args) == 12
    spec = rope.rope_append(rt, tensor((5, (hq + 2 * hkv) * d), "fp32"), tensor((5, hq, d), "fp32"), pool, pool,
                            tensor((blocks,), "int32"), tensor((1,), "int32"), tensor((d // 2,), "fp32"),
                            num_q_heads=hq, num_kv_heads=hkv, head_dim=d, host_pools=host)
    assert rt.asked[-1][1] == "rope_append_host_d128" and spec.args[-2:] == (0x7000, 0x7000)
    # Refusals: device memory as a host pool, a wrong shape, the fp32 oracle.
    with pytest.raises(ValueError, match="page-locked"):
        rope.rope_append(rt, tensor((5, (hq + 2 * hkv) * d), "fp32"), tensor((5, hq, d), "fp32"), pool, pool,
                         tensor((blocks,), "int32"), tensor((1,), "int32"), tensor((d // 2,), "fp32"),
                         num_q_heads=hq, num_kv_heads=hkv, head_dim=d, host_pools=(host[0], _host_tensor(
                             pool_shape(4, hkv, d), pinned=False)))
    with pytest.raises(ValueError, match="v_host has shape"):
        dec.attention_decode(rt, tensor((hq, d), "fp32"), tensor((hq * d,), "fp32"), pool, pool,
                             tensor((blocks,), "int32"), tensor((1,), "int32"), ws, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=d, host_pools=(host[0], _host_tensor(pool_shape(5, hkv, d))))
    with pytest.raises(ValueError, match="oracle"):
        pre.attention_prefill(rt, tensor((5, hq, d), "fp32"), tensor((5, hq * d), "fp32"), pool, pool,
                              tensor((blocks,), "int32"), tensor((1,), "int32"), num_q_heads=hq,
                              num_kv_heads=hkv, head_dim=d, host_pools=host)
    # ... and the batched (rows) launchers: the host tier is for the one-sequence path.
    tables, meta = tensor((2, blocks), "int32"), tensor((5, 4), "int32")
    with pytest.raises(ValueError, match="one-sequence path"):
        rope.rope_append(rt, tensor((5, (hq + 2 * hkv) * d), "fp32"), tensor((5, hq, d), "fp32"), pool, pool,
                         tables, meta, tensor((d // 2,), "fp32"), num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         rows=True, host_pools=host)
    rows_ws = dec.DecodeWorkspace(tensor((5, hkv, 4, 4, d), "fp32"), tensor((5, hkv, 4, 4, 2), "fp32"),
                                  tensor((5, hkv), "int32"), 4, rows=5)
    with pytest.raises(ValueError, match="one-sequence path"):
        dec.attention_decode(rt, tensor((5, hq, d), "fp32"), tensor((5, hq * d), "bf16"), pool, pool, tables,
                             meta, rows_ws, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, host_pools=host)


def test_llm_refuses_bad_budgets_before_loading_and_cpu_has_no_host_tier(cpu_rt, monkeypatch):
    import nexusrt as nrt
    from nexusrt.kvcache import tiers

    with pytest.raises(KvBudgetError, match="below one layer's KV pages"):
        nrt.LLM("synthetic:tiny", backend="cpu", max_context=256, kv_gpu_budget=1)
    monkeypatch.setattr(tiers, "mem_available", lambda: 1000)
    with pytest.raises(KvBudgetError, match="MemAvailable"):
        nrt.LLM("synthetic:llama-3.1-8b", backend="cpu", max_context=8192, kv_gpu_budget=1 << 28)
    monkeypatch.undo()
    with pytest.raises(BackendUnavailable, match="needs backend='cuda'"):
        nrt.LLM("synthetic:llama-3.1-8b", backend="cpu", max_context=8192, kv_gpu_budget=1 << 28)
    assert nrt.memory.stats()["in_use_bytes"] == 0


def test_cli_flag_errors_are_one_line():
    for flag, words in (("1", "below one layer's KV pages"), ("lots", "--kv-gpu-budget must be a size")):
        r = subprocess.run([sys.executable, "-m", "nexusrt.cli.main", "generate", "--model", "synthetic:tiny",
                            "--backend", "cpu", "--prompt", "hi", "--kv-gpu-budget", flag],
                           capture_output=True, text=True, timeout=120, env={"NEXUSRT_BACKEND": "cpu",
                                                                             "PYTHONPATH": ".", "PATH": ""})
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------ GPU
def _tier(table: np.ndarray, k: np.ndarray, v: np.ndarray, host_blocks: int):
    """Split a cache whose logical block i sits in physical block table[i] into a device pool
    and a host pool by :func:`place_oldest_on_host` (same data, tiered table)."""
    n = len(table)
    tiered = place_oldest_on_host(n, host_blocks)
    dev_k, dev_v = (np.zeros(pool_shape(n - host_blocks, *k.shape[1:2], k.shape[3]), BF16) for _ in range(2))
    host_k, host_v = (np.zeros(pool_shape(host_blocks, *k.shape[1:2], k.shape[3]), BF16) for _ in range(2))
    for i, e in enumerate(tiered):
        (hk, hv, j) = (host_k, host_v, ~e) if e < 0 else (dev_k, dev_v, e)
        hk[j], hv[j] = k[table[i]], v[table[i]]
    return tiered, dev_k, dev_v, host_k, host_v


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (28, 4, 128), (6, 2, 64), (32, 8, 64)])
@pytest.mark.parametrize("seq_len", [17, 100, 1000, 4097])
def test_decode_with_half_the_blocks_on_the_host_is_bit_identical(gpu_rt, hq, hkv, d, seq_len):
    import nexusrt as nrt

    n, k, v, table, q, pos, heads, ws = decode_case(hq, hkv, d, seq_len)
    tiered, dk, dv, hk, hv = _tier(table, k, v, max(1, n // 2))  # both tiers hold a block
    host = pinned_pools(hk, hv)
    for mma in [False] + ([True] if dec.mma_ok(gpu_rt) else []):  # the CUDA-core kernels, the mma ones
        out_dev, out_host = (nrt.memory.from_numpy(np.full(hq * d, np.nan, np.float32)) for _ in range(2))
        dec.attention_decode(gpu_rt, q, out_dev, nrt.memory.from_numpy(k), nrt.memory.from_numpy(v),
                             nrt.memory.from_numpy(table), pos, ws, **heads, mma=mma).launch()
        dec.attention_decode(gpu_rt, q, out_host, nrt.memory.from_numpy(dk), nrt.memory.from_numpy(dv),
                             nrt.memory.from_numpy(tiered), pos, ws, **heads, host_pools=host, mma=mma).launch()
        a, b = out_dev.to_numpy(), out_host.to_numpy()
        assert np.isfinite(a).all() and np.array_equal(a, b), f"mma={mma}"


def _runner(path_or_model, budget_fraction, max_context=128, **kw):
    import nexusrt as nrt
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    model = load_model(path_or_model)
    cfg = model.config
    budget = None
    if budget_fraction:
        from nexusrt.backends.cuda.chunks import BUCKETS, buckets_for

        n = blocks_for(max_context + buckets_for(max_context, BUCKETS)[0] - 1)
        budget = max(int(n * budget_fraction), -(-n // cfg.num_hidden_layers)) * block_bytes(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    return CudaRunner(model, nrt.firmware.runtime(), max_context=max_context, kv_gpu_budget=budget, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "llama_sharded", "qwen2_bf16"])
def test_half_host_runner_matches_all_device_exactly(variant, gpu_rt, tmp_path_factory):
    from nexusrt.reference.sampling import SamplingParams
    from test_cuda_model import _checkpoint

    path = _checkpoint(variant, tmp_path_factory)
    ids = np.random.default_rng(5).integers(0, 384, 70).astype(np.int32)
    results = []
    for frac in (0, 0.5):
        r = _runner(path, frac)
        try:
            if frac:
                assert r.kv_plan.host_blocks > 0 and r.kv_tiers()["blocks_host"] == r.kv_plan.host_blocks
            logits = r.forward_all(ids)  # prefill chunks: rope_append_host + prefill_mma_host
            r.reset()
            r.prefill(ids[:50])
            steps = []
            for t in ids[50:]:  # decode steps: the decode graph with the _host kernels
                steps.append(r.last_logits())
                r.decode(int(t))
            got = []
            r.generate_tokens(ids[:60], 40, SamplingParams(temperature=0.0), lambda x: bool(got.append(x)))
            results.append((logits, np.stack(steps), got))
        finally:
            r.close()
    (l0, s0, g0), (l1, s1, g1) = results
    assert np.array_equal(l0, l1) and np.array_equal(s0, s1) and g0 == g1


@pytest.mark.gpu
@pytest.mark.parametrize("reserve", [False, True])
def test_adopted_sequence_decodes_as_its_all_device_source(reserve, gpu_rt, tmp_path_factory):
    # The kv bench fills its host-tier runners with adopt_kv (a prefill into the host tier reads the
    # host half zero-copy per chunk): the adopted runner's decode logits must equal the source's.
    from nexusrt.kvcache.tiers import block_bytes as bb
    from test_cuda_model import _checkpoint

    path = _checkpoint("llama", tmp_path_factory)
    ids = np.random.default_rng(6).integers(0, 384, 90).astype(np.int32)
    src, dst = _runner(path, 0), None
    try:
        cfg = src.config
        kw = {"kv_fault_reserve": bb(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)} if reserve else {}
        dst = _runner(path, 0.5, **kw)
        assert dst.kv_plan.host_blocks > 0
        src.prefill(ids[:70])
        dst.adopt_kv(src)
        assert dst.position == 70
        with pytest.raises(ValueError, match="needs an empty runner"):
            dst.adopt_kv(src)
        got = []
        for t in ids[70:]:
            src.decode(int(t))
            dst.decode(int(t))
            got.append((src.last_logits(), dst.last_logits()))
        assert all(np.array_equal(a, b) for a, b in got)
    finally:
        for r in (src, dst):
            if r is not None:
                r.close()


@pytest.mark.gpu
def test_cancelled_request_with_host_blocks_leaves_no_memory(gpu_rt):
    import nexusrt as nrt
    from nexusrt.kvcache.tiers import block_bytes as bb

    before = nrt.memory.stats()
    llm = nrt.LLM("synthetic:tiny", backend="cuda", max_context=512)
    cfg = llm.config
    n = llm.runner.kv_plan.device_blocks
    llm.close()
    llm = nrt.LLM("synthetic:tiny", backend="cuda", max_context=512,
                  kv_gpu_budget=(n // 2) * bb(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim))
    assert llm.runner.kv_plan.host_blocks > 0 and nrt.memory.stats()["pinned_bytes"] > before["pinned_bytes"]
    stream = llm.stream("hello " * 40, max_new_tokens=200, temperature=0)
    next(iter(stream))
    stream.close()  # cancelled mid-generation
    result = llm.generate("hello", max_new_tokens=8, temperature=0)
    assert result.kv["blocks_host"] == llm.runner.kv_plan.host_blocks
    llm.close()
    after = nrt.memory.stats()
    assert after["in_use_bytes"] == before["in_use_bytes"] and after["pinned_bytes"] == before["pinned_bytes"]
    assert not [a for a in nrt.memory.audit() if a.get("tag") == "kv_host"]
