"""h2o's attention scores from the decode rows kernels (``attention_decode_rows_scores_*`` and
``attention_scores_rows`` in ``cu/attention_scores.cu``).

CPU: the twins and the accumulate kernel build for sm_80 and sm_90a; the launchers pick them and
name what is wrong; a NumPy model of the kernels' arithmetic (exp2-domain logits, each split's
softmax state, the combine's final max and sum, probabilities summed over the heads) gives the
CPU decoder's per-key mass (``attend_row``) for every split plan.
GPU: the kernels' scores against a float64 NumPy reference on random q/K/V, over rows of
different lengths, every split count and a fixed chunk, with the attention output unchanged
bit for bit against the kernel without scores. No torch, so compute-sanitizer runs it quickly.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from nexusrt.backends.cpu.decoder import attend_row
from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import attention_decode as dec
from nexusrt.kvcache.blocks import BLOCK_SIZE, pool_shape

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16
LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_scores_twin_and_the_accumulate_kernel_are_built(arch):
    cubin = compile_file("attention_scores", arch).cubin
    names = {dec.kernel_name(d, g, rows=True, scores=True) for d in dec.HEAD_DIMS for g in range(1, dec.MAX_GROUP + 1)}
    assert len(names) == 12
    for name in sorted(names) + [dec.ACCUMULATE]:
        assert name.encode() in cubin, f"{name} missing from attention_scores.cu for {arch}"


def _rows_args(rows=3, hq=32, hkv=8, d=128, blocks=10, splits=4, stride=160):
    g = hq // hkv
    ws = dec.DecodeWorkspace(tensor((rows, hkv, splits, g, d), "fp32"), tensor((rows, hkv, splits, g, 2), "fp32"),
                             tensor((rows, hkv), "int32"), splits, rows=rows)
    scores = dec.ScoresWorkspace(tensor((rows, hq, stride), "fp32", ptr=0x2000), tensor((rows, hq, 2), "fp32", ptr=0x3000),
                                 tensor((rows, stride), "fp32", ptr=0x4000), rows, stride)
    return dict(q=tensor((rows, hq, d), "fp32"), out=tensor((rows, hq * d), "bf16"),
                k_pool=tensor(pool_shape(blocks, hkv, d), "bf16"), v_pool=tensor(pool_shape(blocks, hkv, d), "bf16"),
                block_table=tensor((rows, blocks), "int32"), pos=tensor((rows, 4), "int32"), workspace=ws,
                scores=scores)


def test_the_launcher_picks_the_scores_twin_and_passes_the_workspace_last():
    rt = FakeRuntime()
    spec = dec.attention_decode(rt, **_rows_args(), num_q_heads=32, num_kv_heads=8, head_dim=128)
    assert [(s, n, len(sig.split())) for s, n, sig in rt.asked] == [("attention_scores", "attention_decode_rows_scores_d128_g4", 18)]
    assert spec.args[-3:] == (0x2000, 0x3000, 160) and spec.grid == (8, 4, 3)
    plain = dec.attention_decode(rt, **{**_rows_args(), "scores": None}, num_q_heads=32, num_kv_heads=8, head_dim=128)
    assert rt.asked[-1][:2] == ("attention_decode", "attention_decode_rows_d128_g4") and spec.args[:-3] == plain.args
    assert dec.kernel_name(64, 3, rows=True, scores=True) == "attention_decode_rows_scores_d64_gmax4"


def test_the_accumulate_launcher_covers_every_slot_of_every_row():
    rt = FakeRuntime()
    s = _rows_args(stride=300)["scores"]
    spec = dec.accumulate_scores(rt, s, tensor((2, 4), "int32", ptr=0x5000), rows=2, num_q_heads=32)
    assert rt.asked == [("attention_scores", "attention_scores_rows", dec.ACCUMULATE_SIGNATURE)]
    assert spec.grid == (3, 2, 1) and spec.block == (128, 1, 1)
    assert spec.args == (0x2000, 0x3000, 0x5000, 0x4000, 32, 300)
    assert not spec.pdl  # it reads what the attention kernel just wrote: plain stream order


def _one_sequence_args():
    a = _rows_args(rows=1)
    ws = dec.DecodeWorkspace(tensor((8, 4, 4, 128), "fp32"), tensor((8, 4, 4, 2), "fp32"), tensor((8,), "int32"), 4)
    return {**a, "q": tensor((32, 128), "fp32"), "out": tensor((32 * 128,), "fp32"), "block_table": tensor((10,), "int32"),
            "pos": tensor((1,), "int32"), "workspace": ws}


@pytest.mark.parametrize("change, message", [
    (dict(scores="raw"), "scores must be a ScoresWorkspace"),
    (dict(scores=_rows_args(rows=2)["scores"]), "holds 2 rows; the launch has 3"),
    (dict(scores=dec.ScoresWorkspace(tensor((3, 16, 160), "fp32"), tensor((3, 32, 2), "fp32"),
                                     tensor((3, 160), "fp32"), 3, 160)), "scores.raw has shape"),
    (dict(scores=dec.ScoresWorkspace(tensor((3, 32, 160), "fp32"), tensor((3, 32, 2), "fp32"),
                                     tensor((3, 160), "bf16"), 3, 160)), "scores.scores has dtype"),
    (dict(host_pools=(tensor(pool_shape(4, 8, 128), "bf16"),) * 2), "device-resident KV blocks only"),
])
def test_the_launcher_names_what_is_wrong_with_the_scores(change, message):
    args = {**_rows_args(), **change}
    if "host_pools" in change:  # host tensors as check_host_pools wants them
        for t in args["host_pools"]:
            t.device, t.pinned = False, True
    with pytest.raises(ValueError, match=message):
        dec.attention_decode(FakeRuntime(), **args, num_q_heads=32, num_kv_heads=8, head_dim=128)


def test_the_one_sequence_kernel_writes_no_scores():
    with pytest.raises(ValueError, match="rows kernels only"):
        dec.attention_decode(FakeRuntime(), **_one_sequence_args(), num_q_heads=32, num_kv_heads=8, head_dim=128)


def test_the_workspace_size_at_the_8b_shape():
    # Llama-3 8B: 32 q heads; 64 rows at an 8192-token context.
    assert dec.scores_bytes(32, 64, 8192) == 4 * 64 * 33 * 8192 + 8 * 64 * 32
    assert dec.scores_bytes(32, 64, 8192) / 2**20 == pytest.approx(66.0, abs=0.05)


def kernel_model(q: np.ndarray, k: np.ndarray, max_splits: int, step: int, fixed_chunk: int = 0) -> np.ndarray:
    """What the scores twin and ``attention_scores_rows`` compute for one row, in fp32: the
    exp2-domain logits, each split's (max, sum), the combine's final (max, sum) per head, then
    each key's probability summed over the heads. ``q [Hq, D]``, ``k [S, Hkv, D]`` -> ``[S]``."""
    hq, d = q.shape
    s_len, hkv = k.shape[:2]
    qs = (q * np.float32(1 / math.sqrt(d) * LOG2E)).astype(np.float32).reshape(hkv, hq // hkv, d)
    raw = np.einsum("kgd,skd->kgs", qs, k, dtype=np.float32).reshape(hq, s_len)
    chunk, nsplit = dec.split_plan(s_len, max_splits, step)
    chunk = max(chunk, fixed_chunk)
    nsplit = -(-s_len // chunk)
    ms, ls = [], []
    for sp in range(nsplit):
        part = raw[:, sp * chunk:(sp + 1) * chunk]
        m = part.max(axis=1)
        ms.append(m)
        ls.append(np.exp2(part - m[:, None]).sum(axis=1, dtype=np.float32))
    ms, ls = np.stack(ms), np.stack(ls)
    big = ms.max(axis=0)
    total = (ls * np.exp2(ms - big)).sum(axis=0, dtype=np.float32)
    return (np.exp2(raw - big[:, None]) / total[:, None]).sum(axis=0, dtype=np.float32)


@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (12, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("seq_len", [1, 17, 300, 2049])
@pytest.mark.parametrize("max_splits", [1, 7, 128])
def test_the_kernels_arithmetic_gives_the_cpu_decoders_mass(hq, hkv, d, seq_len, max_splits):
    rng = np.random.default_rng(seq_len * 7 + hq + max_splits)
    q = rng.standard_normal((hq, d), dtype=np.float32) * 2  # peaky enough that the max matters
    k = rng.standard_normal((seq_len, hkv, d), dtype=np.float32)
    v = rng.standard_normal((seq_len, hkv, d), dtype=np.float32)
    mass = np.zeros(seq_len)
    attend_row(q, k, v, mass)
    got = kernel_model(q, k, max_splits, dec.tokens_per_step(d, hq // hkv))
    np.testing.assert_allclose(got, mass, rtol=2e-5, atol=1e-7 * hq)
    assert got.sum() == pytest.approx(hq, rel=1e-5)  # every head's probabilities sum to one


def test_the_model_has_teeth_a_splits_own_max_gives_other_scores():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((8, 64), dtype=np.float32) * 3, rng.standard_normal((500, 2, 64), dtype=np.float32)
    mass = np.zeros(500)
    attend_row(q, k, k, mass)
    raw = (q.reshape(2, 4, 64) * np.float32(LOG2E / 8)) @ k.transpose(1, 2, 0)  # [2, 4, 500]
    wrong = np.exp2(raw[..., :250] - raw[..., :250].max(-1, keepdims=True))  # split 0 normalized alone
    wrong = (wrong / wrong.sum(-1, keepdims=True)).sum(axis=(0, 1))
    assert not np.allclose(wrong, mass[:250], rtol=1e-3)


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (8, 4, 128), (12, 2, 64), (14, 2, 128), (32, 8, 128)])
def test_the_kernels_scores_match_a_float64_reference(gpu_rt, hq, hkv, d):
    """Three rows of 1, 300 and 2049 keys over one paged cache (blocks shuffled, every unused slot
    NaN), each split count and a fixed chunk, two launches (two layers) of the accumulate kernel.
    fp32 tolerance: each probability within 5e-5 relative + 1e-6 absolute of the float64 one (the
    kernel's exp2 and fp32 sums); slots past a row's last stay exactly zero."""
    import nexusrt as nrt

    rng = np.random.default_rng(hq * 131 + d)
    lens = [1, 300, 2049]
    rows, g, longest = len(lens), hq // hkv, max(lens)
    num_blocks = -(-longest // BLOCK_SIZE) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    k = rng.standard_normal((longest, hkv, d), dtype=np.float32).astype(BF16)
    v = rng.standard_normal((longest, hkv, d), dtype=np.float32).astype(BF16)
    k_host = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=BF16)
    v_host = k_host.copy()
    for t in range(longest):
        b, o = order[t // BLOCK_SIZE], t % BLOCK_SIZE
        k_host[b, :, o], v_host[b, :, o] = k[t], v[t]
    q = rng.standard_normal((rows, hq, d), dtype=np.float32) * 2
    meta = np.array([[n - 1, n - 1, 0, 0] for n in lens], np.int32)
    kf = k.astype(np.float64)
    ref = np.zeros((rows, longest))
    for r, n in enumerate(lens):
        logits = np.einsum("kgd,skd->kgs", q[r].astype(np.float64).reshape(hkv, g, d), kf[:n]) / math.sqrt(d)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        ref[r, :n] = (p / p.sum(-1, keepdims=True)).sum(axis=(0, 1))
    dev = dict(k_pool=nrt.memory.from_numpy(k_host), v_pool=nrt.memory.from_numpy(v_host),
               block_table=nrt.memory.from_numpy(np.tile(order, (1, 1))), pos=nrt.memory.from_numpy(meta))
    q_t = nrt.memory.from_numpy(q)
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    step = dec.tokens_per_step(d, g)
    scores = dec.alloc_scores(hq, rows, longest + 5)
    try:
        for splits, fixed in [(1, 0), (dec.choose_splits(hkv * rows, d, g, 4096, 132), 0), (dec.MAX_SPLITS, 0),
                              (dec.MAX_SPLITS, 4 * step)]:
            ws, ws_plain = dec.alloc_workspace(hq, hkv, d, splits, rows=rows), dec.alloc_workspace(hq, hkv, d, splits, rows=rows)
            out = nrt.memory.from_numpy(np.zeros((rows, hq * d), np.float32), dtype="bf16")
            plain = nrt.memory.from_numpy(np.zeros((rows, hq * d), np.float32), dtype="bf16")
            scores.scores.copy_from(np.zeros((rows, scores.stride), np.float32))
            spec = dec.attention_decode(gpu_rt, q_t, out, workspace=ws, fixed_chunk=fixed, scores=scores, **dev, **heads)
            add = dec.accumulate_scores(gpu_rt, scores, dev["pos"], rows=rows, num_q_heads=hq)
            for _ in range(2):  # two layers; the second launch must find the tickets reset
                spec.launch()
                add.launch()
            dec.attention_decode(gpu_rt, q_t, plain, workspace=ws_plain, fixed_chunk=fixed, **dev, **heads).launch()
            got = scores.scores.to_numpy()
            where = f"max_splits={splits} fixed_chunk={fixed}"
            np.testing.assert_allclose(got[:, :longest], 2 * ref, rtol=5e-5, atol=1e-6, err_msg=where)
            assert (got[:, longest:] == 0).all() and (got[0, 1:] == 0).all(), where
            assert np.array_equal(out.to_numpy(), plain.to_numpy()), f"{where}: the output moved"
            assert (ws.tickets.to_numpy() == 0).all(), where
            for t in (ws, ws_plain, out, plain):
                t.free()
    finally:
        scores.free()
