"""sampling kernels: NVRTC builds and the parameter struct on the CPU; on a GPU, the token
against nexusrt.reference.sampling.sample (the spec) for many seeds, parameters and logits,
plus the graph state it advances (pos, step, the host ring)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import sampling as ops
from nexusrt.reference.sampling import SamplingParams, sample

from fakes import FakeRuntime, tensor


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_both_kernels(arch):
    cubin = compile_file("sampling", arch, use_cache=False).cubin
    assert b"sample_argmax_partial" in cubin and b"sample_gather" in cubin and b"sample_finish" in cubin


def test_params_struct_layout_matches_the_kernel():
    raw = ops.pack_params(0.7, 50, 0.9, 2**64 - 1).tobytes()
    assert len(raw) == ops.PARAMS_BYTES == 24
    t, k, p, pad, seed = struct.unpack("<fifiQ", raw)
    assert (k, pad, seed) == (50, 0, 2**64 - 1)
    assert t == pytest.approx(0.7) and p == pytest.approx(0.9)
    with pytest.raises(ValueError, match="seed"):
        ops.pack_params(1.0, 0, 1.0, -1)
    with pytest.raises(ValueError, match="top_k"):
        ops.pack_params(1.0, -3, 1.0, 0)


def test_kernel_source_struct_fields_are_in_the_packed_order():
    from nexusrt.kernels.compiler import SOURCE_DIR

    src = (SOURCE_DIR / "sampling_keys.cuh").read_text()  # shared by sampling.cu and the persistent kernel
    start = src.index("struct SampleParams")
    body = src[src.index("{", start) + 1:src.index("};", start)]
    decls = [line.split("//")[0].split(";")[0].split() for line in body.splitlines()]
    decls = [d for d in decls if d]
    assert [d[-1] for d in decls] == ["temperature", "top_k", "top_p", "pad_", "seed"]
    assert [" ".join(d[:-1]) for d in decls] == ["float", "int", "float", "int", "unsigned long long"]


def test_launcher_constants_are_the_kernel_sources():
    """The launcher sizes grids and buffers from PART_CHUNK and the thread counts; the kernels
    loop over kPartChunk. A launcher chunk larger than the kernel's would skip logits silently."""
    import re

    from nexusrt.kernels.compiler import SOURCE_DIR

    src = (SOURCE_DIR / "sampling.cu").read_text()
    consts = dict(re.findall(r"constexpr int (k\w+) = (\d+);", src))
    assert int(consts["kPartChunk"]) == ops.PART_CHUNK == 1024
    assert int(consts["kPartThreads"]) == ops.PART_THREADS
    assert int(consts["kFinishThreads"]) == ops.FINISH_THREADS


def test_launcher_sizes_the_partial_grid_by_vocab_and_checks_tensors():
    vocab = 151936
    n = ops.num_parts(vocab)
    hist = tensor((ops.TOPK_HIST_WORDS,), "int32", ptr=0x2000)
    pool = tensor((ops.TOPK_POOL_WORDS,), "int64", ptr=0x3000)
    bufs = ops.SamplerBuffers(tensor((24,), "uint8"), tensor((n,), "fp32"), tensor((n,), "int32"), hist, pool)
    word = tensor((1,), "int32")
    partial, gather, finish = ops.sample(FakeRuntime(), tensor((vocab,), "fp32"), bufs, word, word, word,
                                         tensor((16,), "int32"), 16)
    assert n == 149 and partial.grid == gather.grid == (149, 1, 1)  # ceil(151936 / 1024)
    assert partial.block == gather.block == (256, 1, 1)
    assert finish.grid == (1, 1, 1) and finish.block == (1024, 1, 1)
    assert finish.args[5] == n and finish.args[-1] == 16
    # The three launches share the grid-wide top-K's histogram (+ cursor) and pool.
    assert partial.args[-1] == gather.args[3] == finish.args[6] == hist.ptr
    assert gather.args[4] == finish.args[7] == pool.ptr
    with pytest.raises(ValueError, match="topk_pool has shape"):
        ops.sample(FakeRuntime(), tensor((vocab,), "fp32"),
                   ops.SamplerBuffers(bufs.params, bufs.part_val, bufs.part_idx, hist, tensor((1024,), "int64")),
                   word, word, word, tensor((16,), "int32"), 16)
    with pytest.raises(ValueError, match="ring has shape"):
        ops.sample(FakeRuntime(), tensor((vocab,), "fp32"), bufs, word, word, word, tensor((8,), "int32"), 16)
    with pytest.raises(ValueError, match="logits has dtype"):
        ops.sample(FakeRuntime(), tensor((vocab,), "bf16"), bufs, word, word, word, tensor((16,), "int32"), 16)
    with pytest.raises(ValueError, match="above the supported"):
        ops.sample(FakeRuntime(), tensor((5_000_000,), "fp32"), bufs, word, word, word, tensor((16,), "int32"), 16)


# ------------------------------------------------------------------------ GPU
def _logits(rng, vocab, kind):
    if kind == "normal":
        return (rng.standard_normal(vocab, dtype=np.float32) * 3).astype(np.float32)
    if kind == "peaked":  # a few tokens carry almost all the mass
        x = rng.standard_normal(vocab, dtype=np.float32)
        x[rng.integers(0, vocab, 5)] += 20
        return x.astype(np.float32)
    if kind == "ties":  # coarse values: many exact ties, also at the top-k cut
        return (np.round(rng.standard_normal(vocab) * 4) / 2).astype(np.float32)
    if kind == "flat":  # uniform: a crowded bucket at the K-th key, pools of 2-3k (the select first)
        return rng.uniform(0, 64, vocab).astype(np.float32)
    raise ValueError(kind)


def _cases():
    rng = np.random.default_rng(2024)
    cases = [  # (vocab, kind, temperature, top_k, top_p, seed, step)
        (128256, "normal", 0.0, 0, 1.0, 1, 0), (151936, "ties", 0.0, 0, 1.0, 1, 3),
        (1000, "normal", 1.0, 0, 1.0, 7, 0), (4097, "ties", 0.8, 0, 1.0, 8, 5),
        (151936, "normal", 0.7, 50, 0.9, 9, 11), (128256, "ties", 1.0, 1024, 1.0, 10, 2),
        (128256, "ties", 1.3, 7, 1.0, 11, 3), (32000, "peaked", 0.6, 0, 0.95, 12, 4),
        (50, "normal", 1.0, 0, 1.0, 13, 9), (151936, "normal", 1.0, 1, 1.0, 14, 1),
        (151936, "normal", 2.0, 5000, 0.5, 15, 6), (128256, "normal", 0.5, 0, 0.01, 16, 7),
        (50000, "flat", 1.0, 0, 1.0, 17, 8), (50000, "flat", 0.7, 0, 0.9, 18, 9),
        (32000, "flat", 1.0, 0, 0.95, 19, 10), (4097, "flat", 0.9, 20, 1.0, 20, 11),
    ]
    for _ in range(48):
        cases.append((int(rng.choice([1000, 4097, 32000, 128256, 151936])),
                      str(rng.choice(["normal", "peaked", "ties"])),
                      float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5])), int(rng.choice([0, 1, 2, 20, 50, 1024, 3000])),
                      float(rng.choice([1.0, 0.95, 0.8, 0.5])), int(rng.integers(0, 2**63)),
                      int(rng.integers(0, 5000))))
    return cases


@pytest.mark.gpu
def test_sampling_kernel_picks_the_spec_token_and_advances_the_state(gpu_rt):
    import nexusrt as nrt

    ring_size = 8
    ring = nrt.memory.pinned((ring_size,), "int32")
    ring.array[...] = -1
    mismatches = []
    for i, (vocab, kind, temp, top_k, top_p, seed, step) in enumerate(_cases()):
        rng = np.random.default_rng(i)
        logits = _logits(rng, vocab, kind)
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, seed=seed)
        want = sample(logits, params, step)
        bufs = ops.alloc_buffers(vocab)
        bufs.set_params(temp, top_k, top_p, seed)
        pos0 = 100 + i
        words = nrt.memory.from_numpy(np.array([pos0, step, -1], dtype=np.int32))
        for spec in ops.sample(gpu_rt, nrt.memory.from_numpy(logits), bufs, words[0:1], words[1:2],
                               words[2:3], ring, ring_size):
            spec.launch()
        gpu_rt.device.synchronize()
        pos, new_step, token = (int(x) for x in words.to_numpy())
        assert (pos, new_step) == (pos0 + 1, step + 1), f"case {i}: state not advanced"
        assert int(ring.array[step % ring_size]) == token, f"case {i}: ring slot differs from token"
        # A sampled step leaves the grid-wide top-K's histogram and cursor zero for the next one.
        assert not bufs.topk_hist.to_numpy().any(), f"case {i}: the top-K histogram was not cleared"
        if token != want:
            mismatches.append((i, vocab, kind, temp, top_k, top_p, seed, step, token, want))
        bufs.free()
    # The spec allows only exp() ulp differences, i.e. u within ~1e-7 of a boundary.
    assert not mismatches, mismatches


@pytest.mark.gpu
def test_greedy_takes_the_lowest_index_among_equal_maxima(gpu_rt):
    import nexusrt as nrt

    vocab = 128256
    ring = nrt.memory.pinned((4,), "int32")
    for first, second in [(5, 9000), (70000, 70001), (1023, 1024), (4095, 4096), (vocab - 2, vocab - 1)]:
        logits = np.random.default_rng(first).standard_normal(vocab).astype(np.float32)
        logits[[first, second]] = 50.0
        bufs = ops.alloc_buffers(vocab)
        words = nrt.memory.from_numpy(np.zeros(3, dtype=np.int32))
        for spec in ops.sample(gpu_rt, nrt.memory.from_numpy(logits), bufs, words[0:1], words[1:2],
                               words[2:3], ring, 4):
            spec.launch()
        assert int(words.to_numpy()[2]) == first
        bufs.free()


@pytest.mark.gpu
def test_same_seed_and_step_repeat_and_steps_differ(gpu_rt):
    import nexusrt as nrt

    vocab = 32000
    logits = nrt.memory.from_numpy(np.zeros(vocab, dtype=np.float32))  # uniform: the draw decides
    ring = nrt.memory.pinned((64,), "int32")
    bufs = ops.alloc_buffers(vocab)
    bufs.set_params(1.0, 0, 1.0, 1234)
    words = nrt.memory.from_numpy(np.zeros(3, dtype=np.int32))
    specs = ops.sample(gpu_rt, logits, bufs, words[0:1], words[1:2], words[2:3], ring, 64)
    for _ in range(40):  # the kernel advances step itself, as in graph replays
        for spec in specs:
            spec.launch()
    gpu_rt.device.synchronize()
    got = [int(x) for x in ring.array[:40]]
    params = SamplingParams(temperature=1.0, seed=1234)
    assert got == [sample(np.zeros(vocab, np.float32), params, s) for s in range(40)]
    assert len(set(got)) > 30  # 1024 equally likely candidates: repeats are rare
    bufs.free()
