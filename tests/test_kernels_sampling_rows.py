"""The batched sampler of cu/sampling.cu (``sample_rows_partial`` + ``sample_rows_finish``): on
the CPU, its NVRTC build, the per-row parameter array and the launcher's checks; on a GPU, every
row's pick against nexusrt.reference.sampling.sample (the spec) with rows of different
temperature, top_k, top_p, seed and step in one launch, ties, vocabularies of 128256 and 384, and
bit-for-bit agreement with the one-row kernels (same device code, so not even an ulp may differ).
"""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import sampling as ops
from nexusrt.reference.sampling import SamplingParams, sample

from fakes import FakeRuntime, tensor

INT_MAX = 2**31 - 1


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_the_rows_kernels_the_launcher_asks_for(arch):
    rt = FakeRuntime()
    m, vocab = 3, 128256
    n = ops.num_parts(vocab)
    ops.sample_rows(rt, tensor((m, vocab), "fp32"), tensor((m, 24), "uint8"), tensor((m,), "int32"),
                    tensor((m, n), "fp32"), tensor((m, n), "int32"), tensor((m,), "int32"))
    cubin = compile_file("sampling", arch, use_cache=False).cubin
    asked = [name for _, name, _ in rt.asked]
    assert asked == ["sample_rows_partial", "sample_rows_finish"]
    for name in asked + ["sample_argmax_partial", "sample_finish"]:
        assert name.encode() in cubin, f"{name} missing for {arch}"


def test_params_rows_are_the_one_row_structs_stacked():
    rows = [(0.0, 0, 1.0, 0), (0.7, 50, 0.9, 2**64 - 1), (1.5, 3000, 0.5, 12345)]
    packed = ops.pack_params_rows(rows)
    assert packed.shape == (3, ops.PARAMS_BYTES) and packed.dtype == np.uint8
    for r, row in enumerate(rows):
        assert packed[r].tobytes() == ops.pack_params(*row).tobytes()
    assert not packed[0][:4].any()  # temperature 0.0 is four zero bytes: zeroed staging means greedy
    assert ops.pack_params_rows([]).shape == (0, ops.PARAMS_BYTES)
    with pytest.raises(ValueError, match="seed"):
        ops.pack_params_rows([(1.0, 0, 1.0, 0), (1.0, 0, 1.0, -5)])


def _args(m=4, vocab=151936, **over):
    n = ops.num_parts(vocab)
    args = dict(logits=tensor((m, vocab), "fp32"), params=tensor((m, 24), "uint8"), steps=tensor((m,), "int32"),
                part_val=tensor((m, n), "fp32"), part_idx=tensor((m, n), "int32"), out=tensor((m,), "int32"))
    args.update(over)
    return args


def test_launcher_grids_and_arguments():
    m, vocab = 5, 151936
    n = ops.num_parts(vocab)
    a = _args(m, vocab, params=tensor((m, 24), "uint8", ptr=0x2000), steps=tensor((m,), "int32", ptr=0x3000),
              out=tensor((m,), "int32", ptr=0x4000))
    partial, finish = ops.sample_rows(FakeRuntime(), **a)
    assert n == 149 and partial.grid == (149, m, 1) and partial.block == (256, 1, 1)  # ceil(151936 / 1024)
    assert finish.grid == (m, 1, 1) and finish.block == (1024, 1, 1)
    assert partial.args == (0x1000, vocab, 0x2000, 0x1000, 0x1000, m)
    assert finish.args == (0x1000, vocab, 0x2000, 0x3000, 0x1000, 0x1000, n, 0x4000, m)
    small, _ = ops.sample_rows(FakeRuntime(), **_args(300, 384))
    assert small.grid == (1, 300, 1)  # a vocabulary under one chunk: one partial per row


@pytest.mark.parametrize("field, bad, match", [
    ("logits", tensor((151936,), "fp32"), "2-d fp32"),
    ("logits", tensor((4, 151936), "bf16"), "logits has dtype"),
    ("logits", tensor((4, 5_000_000), "fp32"), "above the supported"),
    ("params", tensor((4, 23), "uint8"), "params has shape"),
    ("params", tensor((3, 24), "uint8"), "params has shape"),
    ("params", tensor((4, 24), "int8"), "params has dtype"),
    ("params", tensor((4, 24), "uint8", ptr=0x1004), "8-byte aligned"),
    ("steps", tensor((3,), "int32"), "steps has shape"),
    ("steps", tensor((4,), "int64"), "steps has dtype"),
    ("part_val", tensor((4, 148), "fp32"), "part_val has shape"),
    ("part_idx", tensor((4, 149), "fp32"), "part_idx has dtype"),
    ("out", tensor((5,), "int32"), "out has shape"),
    ("out", None, "out is required"),
])
def test_launcher_rejects_a_bad_tensor_by_name(field, bad, match):
    with pytest.raises(ValueError, match=match):
        ops.sample_rows(FakeRuntime(), **_args(**{field: bad}))


def test_launcher_rejects_too_many_rows():
    with pytest.raises(ValueError, match="above the supported 65535"):
        ops.sample_rows(FakeRuntime(), **_args(70000, 384))


# ------------------------------------------------------------------------ GPU
def _logits(rng, vocab, kind):
    x = rng.standard_normal(vocab).astype(np.float32)
    if kind == "normal":
        return x * 3
    if kind == "peaked":  # a few tokens carry almost all the mass
        x[rng.integers(0, vocab, 5)] += 20
        return x
    if kind == "ties":  # coarse values: many exact ties, also at the top-k cut
        return (np.round(x * 4) / 2).astype(np.float32)
    raise ValueError(kind)


def _mixed_rows(vocab, m, seed):
    """m rows of logits and their (params, step): greedy and sampling rows side by side."""
    rng = np.random.default_rng(seed)
    logits = np.stack([_logits(rng, vocab, str(rng.choice(["normal", "peaked", "ties"]))) for _ in range(m)])
    fixed = [(0.0, 0, 1.0, 0), (1.0, 0, 1.0, 7), (0.7, 50, 0.9, 9), (1.3, 7, 1.0, 11), (1.0, 1, 1.0, 14),
             (2.0, 5000, 0.5, 15), (0.5, 0, 0.01, 16), (0.6, 0, 0.95, 12)]
    rows = []
    for r in range(m):
        t, k, p, s = fixed[r] if r < len(fixed) else (
            float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5])), int(rng.choice([0, 1, 2, 20, 50, 1024, 3000])),
            float(rng.choice([1.0, 0.95, 0.8, 0.5])), int(rng.integers(0, 2**63)))
        rows.append((SamplingParams(temperature=t, top_k=k, top_p=p, seed=s), int(rng.integers(0, 5000))))
    return logits.astype(np.float32), rows


def _run_rows(rt, logits, rows):
    """The batched sampler's picks for ``rows`` ((params, step) per logits row)."""
    import nexusrt as nrt

    m, vocab = logits.shape
    n = ops.num_parts(vocab)
    packed = ops.pack_params_rows([(p.temperature, p.top_k, p.top_p, p.seed) for p, _ in rows])
    t = [nrt.memory.from_numpy(logits), nrt.memory.from_numpy(packed),
         nrt.memory.from_numpy(np.array([s for _, s in rows], dtype=np.int32)),
         nrt.memory.empty((m, n), "fp32"), nrt.memory.empty((m, n), "int32"),
         nrt.memory.from_numpy(np.full(m, -1, dtype=np.int32))]
    try:
        for spec in ops.sample_rows(rt, *t):
            spec.launch()
        rt.device.synchronize()
        return t[-1].to_numpy().astype(np.int64)
    finally:
        for x in t:
            x.free()


def _run_one(rt, logits_row, params, step):
    """The one-row pair's pick (the decode graph's sampler) for one row."""
    import nexusrt as nrt

    vocab = logits_row.shape[0]
    ring = nrt.memory.pinned((4,), "int32")
    bufs = ops.alloc_buffers(vocab)
    bufs.set_params(params.temperature, params.top_k, params.top_p, params.seed)
    words = nrt.memory.from_numpy(np.array([0, step, -1], dtype=np.int32))
    logits = nrt.memory.from_numpy(logits_row)
    try:
        for spec in ops.sample(rt, logits, bufs, words[0:1], words[1:2], words[2:3], ring, 4):
            spec.launch()
        rt.device.synchronize()
        return int(words.to_numpy()[2])
    finally:
        for x in (bufs, words, logits, ring):
            x.free()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, m", [(128256, 40), (384, 300), (151936, 9), (4097, 17)])
def test_every_row_picks_the_spec_token_in_one_launch(gpu_rt, vocab, m):
    logits, rows = _mixed_rows(vocab, m, seed=vocab + m)
    got = _run_rows(gpu_rt, logits, rows)
    want = [sample(logits[r], p, s) for r, (p, s) in enumerate(rows)]
    bad = [(r, rows[r], int(got[r]), want[r]) for r in range(m) if got[r] != want[r]]
    assert sum(p.greedy for p, _ in rows) >= 1 and sum(not p.greedy for p, _ in rows) >= 5
    # The spec allows only exp() ulp differences, i.e. u within ~1e-7 of a boundary.
    assert not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 384])
def test_rows_equal_the_one_row_kernels_bit_for_bit(gpu_rt, vocab):
    logits, rows = _mixed_rows(vocab, 12, seed=3)
    got = _run_rows(gpu_rt, logits, rows)
    one = [_run_one(gpu_rt, logits[r], p, s) for r, (p, s) in enumerate(rows)]
    assert got.tolist() == one  # the same device functions: no tolerance


@pytest.mark.gpu
def test_greedy_rows_take_the_lowest_index_among_equal_maxima(gpu_rt):
    vocab = 128256
    pairs = [(5, 9000), (70000, 70001), (1023, 1024), (4095, 4096), (vocab - 2, vocab - 1), (0, 4096 * 31)]
    logits = np.random.default_rng(1).standard_normal((len(pairs) + 1, vocab)).astype(np.float32)
    for r, (first, second) in enumerate(pairs):
        logits[r, [first, second]] = 50.0
    logits[-1] = np.nan  # a row of NaN: INT_MAX, which the batch runner reports
    greedy = (SamplingParams(seed=0), 0)
    got = _run_rows(gpu_rt, logits, [greedy] * len(logits))
    assert got.tolist() == [first for first, _ in pairs] + [INT_MAX]


@pytest.mark.gpu
def test_each_row_draws_at_its_own_step_and_seed(gpu_rt):
    """Uniform logits: only the draw decides, so a row's pick is a function of (seed, step)."""
    vocab = 32000
    m = 48
    logits = np.zeros((m, vocab), dtype=np.float32)
    rows = [(SamplingParams(temperature=1.0, seed=1234 + (r % 2)), r // 2) for r in range(m)]
    got = _run_rows(gpu_rt, logits, rows).tolist()
    assert got == [sample(logits[0], p, s) for p, s in rows]
    assert len(set(got)) > 40  # 1024 equally likely candidates: repeats are rare



@pytest.mark.gpu
def test_device_prefix_sums_are_the_spec_sequential_chain(gpu_rt):
    """The one draw (tests/sampling_order_case.py) where the spec's sequential fp32 chain picks
    index 0 and a chunked (parallel-scan shaped) sum picks far past it: both device samplers
    pick the spec's token, so neither reorders the additions."""
    import sampling_order_case as case

    x, params, step = case.logits(), case.params(), case.step()
    want = sample(x, params, step)
    assert want == 0 and case.chunked_pick(x, params, step) >= 32
    assert _run_one(gpu_rt, x, params, step) == want
    rows = [(params, step), (SamplingParams(temperature=0.0, seed=0), 0)]
    assert _run_rows(gpu_rt, np.stack([x, x]), rows).tolist() == [want, 0]
