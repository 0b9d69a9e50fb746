"""The persistent decode kernel on the CPU: it compiles (NVRTC, sm_90a and sm_80) with every
kernel the launcher asks for; the kernel's enums (parameter slots, layer slots, opcodes, row
width, block size) agree with the Python side; the launcher's checks; the counters' epoch rule
across steps and the 2**32 wrap; the runner hook (NEXUSRT_DECODE) and the device program a
PersistentDecode uploads, built in the CPU arena through the real launchers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nexusrt.backends.cuda import persistent as P
from nexusrt.backends.cuda.megakernel import counters as C
from nexusrt.backends.cuda.megakernel import topk
from nexusrt.backends.cuda.megakernel.instructions import ROW_WORDS, Op
from nexusrt.backends.cuda.megakernel.lower import lower, skeleton
from nexusrt.errors import ModelError
from nexusrt.kernels.compiler import SOURCE_DIR, compile_file
from nexusrt.kernels.ops import persistent as pk
from nexusrt.kernels.ops import sampling
from tests.fakes import FakeKernel, FakeRuntime, tensor
from tests.test_cuda_step_cpu import _config, _device_weights, no_occupancy_query  # noqa: F401

KERNELS = [f"persistent_decode_d{d}_g{g}" for d in pk.HEAD_DIMS for g in pk.GROUP_BOUNDS]


def _enum(text: str, name: str) -> list[str]:
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", text, re.S).group(1)
    return [e.strip() for e in body.replace("\n", " ").split(",") if e.strip()]


def _snake(k: str) -> str:
    k = k[2:] if re.match(r"kW[a-z]", k) else k[1:]  # kWqkv -> qkv (a weight), kPartMl -> PartMl
    return re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower()


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_the_kernel_compiles_with_every_instantiation(arch):
    cubin = compile_file(pk.SOURCE, arch, use_cache=arch != "sm_90a").cubin
    assert cubin[:4] == b"\x7fELF"
    for name in KERNELS:
        assert name.encode() in cubin, f"{name} missing for {arch}"
    # The entries with a loader warpgroup fill the weight ring with bulk copies: sm_90 only, and a
    # module of their own (the default launch never compiles them).
    loaders = [pk.kernel_name(d, g, loader=True) for d in pk.HEAD_DIMS for g in pk.GROUP_BOUNDS]
    assert not any(name.encode() in cubin for name in loaders)
    cubin = compile_file(pk.LOADER_SOURCE, arch).cubin
    assert all((name.encode() in cubin) == (arch == "sm_90a") for name in loaders), arch
    assert not any(f"{name}\0".encode() in cubin for name in KERNELS)


def test_kernel_enums_match_the_python_side():
    text = (SOURCE_DIR / "persistent_decode.cuh").read_text()
    slots = _enum(text, "Slot")
    assert slots[-1] == "kNumSlots" and tuple(_snake(s) for s in slots[:-1]) == pk.SLOTS
    layer = _enum(text, "LayerSlot")
    assert layer[-1] == "kLayerSlots" and tuple(_snake(s) for s in layer[:-1]) == pk.LAYER_SLOTS
    ops = _enum(text, "Op")
    assert ops[0] == "EMBED = 1" and [o.split()[0] for o in ops] == [o.name for o in Op]
    # ring_page_starts names the weight-streaming opcodes by number (kernels/ops may not import the
    # backends' Op): they must be the ones the kernel's gemv_k gives a row length.
    assert {Op(code).name: length for code, length in pk._GEMV_K.items()} == {
        "QKV": "hidden", "O_PROJ": "q_width", "GATE_UP": "hidden", "DOWN": "inter", "LM_HEAD": "hidden"}
    assert Op(pk._GATE_UP).name == "GATE_UP"
    assert int(re.search(r"kRowWords = (\d+);", text).group(1)) == ROW_WORDS
    assert int(re.search(r"sizeof\(PoolShared\) == (\d+)", text).group(1)) == pk.FINISH_SHARED_BYTES
    # The grid-wide top-K: the kernel's constants, the launcher's buffer sizes and the CPU model agree.
    grid = (SOURCE_DIR / "sampling_grid.cuh").read_text()
    bits = int(re.search(r"kBucketBits = (\d+);", grid).group(1))
    pool = int(re.search(r"kPoolMax = (\d+);", grid).group(1))
    assert (bits, pool) == (topk.BUCKET_BITS, topk.POOL_MAX)
    assert sampling.TOPK_HIST_WORDS == topk.BUCKETS + 1 and sampling.TOPK_POOL_WORDS == topk.POOL_MAX
    assert "kCursorWord = kBuckets;" in grid
    topk_h = (SOURCE_DIR / "sampling_keys.cuh").read_text()
    sort = [int(re.search(rf"{name} = (\d+);", topk_h).group(1)) for name in ("kSortBuckets", "kCrowded", "kBucketSortMax")]
    assert sort == [topk.SORT_BUCKETS, topk.CROWDED, topk.BUCKET_SORT_MAX]
    tiles = (SOURCE_DIR / "persistent_tiles.cuh").read_text()
    assert int(re.search(r"kThreads = (\d+);", tiles).group(1)) == pk.THREADS
    kernel = (SOURCE_DIR / "persistent_decode.cuh").read_text()
    assert int(re.search(r"kLoaderThreads = (\d+);", kernel).group(1)) == pk.LOADER_THREADS
    assert int(re.search(r"kMaxSplits = (\d+);", tiles).group(1)) == pk.MAX_SPLITS


def _values(**over):
    v = {name: tensor((1,), "fp32", ptr=0x1000 + 16 * i) for i, name in enumerate(pk.SLOTS)}
    v.update(hidden=256, inter=512, vocab=384, hq=4, hkv=2, splits=16, ring_size=256, slice_rows=40,
             profile=None, eps=1e-6, scale=0.125)
    v.update(over)
    return v


def test_pack_params_lays_out_every_slot_and_refuses_gaps():
    out = pk.pack_params(_values())
    assert out.dtype == np.uint64 and out.shape == (len(pk.SLOTS),)
    assert out[pk.SLOTS.index("x")] == 0x1000 + 16 * pk.SLOTS.index("x")
    assert out[pk.SLOTS.index("vocab")] == 384
    assert np.array([out[pk.SLOTS.index("scale")]], np.uint32).view(np.float32)[0] == np.float32(0.125)
    v = _values()
    del v["ring"]
    with pytest.raises(ValueError, match="missing.*ring"):
        pk.pack_params(v)
    with pytest.raises(ValueError, match="unknown.*nonsense"):
        pk.pack_params(_values(nonsense=1))
    with pytest.raises(ValueError, match="splits must be a positive int"):
        pk.pack_params(_values(splits=0))
    with pytest.raises(ValueError, match="logits is a required pointer"):
        pk.pack_params(_values(logits=None))
    assert out[pk.SLOTS.index("profile")] == 0  # no clock record
    with pytest.raises(ValueError, match="slice_rows must be a positive int"):
        pk.pack_params(_values(slice_rows=0))


def test_pack_layers_allows_only_the_optional_weights_to_be_absent():
    lw = {name: tensor((1,), "fp32", ptr=0x2000 + i) for i, name in enumerate(pk.LAYER_SLOTS)}
    out = pk.pack_layers([lw, {**lw, "qkv_bias": None, "q_norm": None, "k_norm": None}])
    assert out.shape == (2, len(pk.LAYER_SLOTS)) and out[1, pk.LAYER_SLOTS.index("qkv_bias")] == 0
    assert out[1, pk.LAYER_SLOTS.index("down")] == 0x2000 + pk.LAYER_SLOTS.index("down")
    with pytest.raises(ValueError, match="layer 0: o is a required pointer"):
        pk.pack_layers([{**lw, "o": None}])


def _launch(rt, **over):
    kw = dict(hidden=256, inter=512, num_q_heads=4, num_kv_heads=2, head_dim=64, splits=16, slice_rows=40)
    kw.update(over)
    return pk.persistent_decode(rt, tensor((len(pk.SLOTS),), "int64"), **kw)


def test_launcher_grid_kernel_and_refusals(monkeypatch):
    monkeypatch.setattr(pk, "resident_blocks", lambda kernel, threads, shared: 1)
    rt = FakeRuntime(sm_count=132)
    spec = _launch(rt)
    assert spec.grid == (132, 1, 1) and spec.block == (256, 1, 1) and spec.cooperative
    # A small model: the sampling finish's top-K workspace (larger than this small model's staged
    # input, which it overlays), then 40 program rows; with the weight ring, every whole page left.
    lead = pk.FINISH_SHARED_BYTES + 64 * 40
    assert spec.name == "persistent_decode_d64_g2" and spec.shared == lead
    ringed = _launch(rt, ring=True)
    assert ringed.shared == lead + (pk.SMEM_OPTIN_LIMIT - 20 * 1024 - lead) // pk.RING_PAGE_BYTES * pk.RING_PAGE_BYTES
    assert ringed.name == "persistent_decode_d64_g2" and ringed.block == (256, 1, 1)  # its readers refill it
    loaded = _launch(rt, ring=True, loader=True)  # a loader warpgroup fills it: the _loader entry, 384 threads
    assert loaded.name == "persistent_decode_loader_d64_g2" and loaded.block == (256 + pk.LOADER_THREADS, 1, 1)
    assert loaded.shared == ringed.shared
    # Each from its module: the loader entries are a module of their own, compiled only when asked for.
    assert [a[:2] for a in rt.asked[-3:]] == [(pk.SOURCE, ringed.name), (pk.SOURCE, ringed.name),
                                            (pk.LOADER_SOURCE, loaded.name)]
    with pytest.raises(ValueError, match="loader=True needs ring=True"):
        _launch(rt, loader=True)
    assert pk.FINISH_SHARED_BYTES > 4 * 512
    assert _launch(rt, num_q_heads=6, head_dim=128).name == "persistent_decode_d128_g4"  # G = 3 -> GM 4
    kernel = FakeKernel()
    _launch(FakeRuntime(kernel=kernel))
    assert kernel.carveout is None  # the driver's L1/shared split, not the one the other kernels share
    assert kernel.shared == lead  # opted in under 48 KiB too: static memory adds to it
    k = FakeKernel()
    big = _launch(FakeRuntime(k), hidden=4096, inter=14336, num_q_heads=32, num_kv_heads=8, head_dim=128)
    assert big.shared == 4 * 14336 + 64 * 40 and k.shared == big.shared  # the 8B shape's staged input sets it
    # With the ring, the 8B shape: it takes what the opt-in limit leaves past the static and the lead part.
    k = FakeKernel()
    big = _launch(FakeRuntime(k), hidden=4096, inter=14336, num_q_heads=32, num_kv_heads=8, head_dim=128, ring=True)
    pages = (pk.SMEM_OPTIN_LIMIT - k.static - 4 * 14336 - 64 * 40) // pk.RING_PAGE_BYTES
    assert 20 < pages < 64 and big.shared == 4 * 14336 + 64 * 40 + pages * pk.RING_PAGE_BYTES
    assert k.shared == big.shared and k.shared + k.static <= pk.SMEM_OPTIN_LIMIT  # opted in, and it fits
    full = FakeKernel()
    full.static = pk.SMEM_OPTIN_LIMIT - lead - pk.RING_PAGE_BYTES + 1  # not one page left
    with pytest.raises(ValueError, match="no 4096-byte page for the weight ring"):
        _launch(FakeRuntime(full), ring=True)
    assert _launch(FakeRuntime(full)).shared == lead  # the 16-byte loads need no page
    for over, msg in ((dict(head_dim=96), "head_dim"), (dict(num_q_heads=32, num_kv_heads=2), "up to 8"),
                      (dict(hidden=260), "multiple of 8"), (dict(splits=129), "splits 129"),
                      (dict(num_q_heads=5), "not a multiple"), (dict(inter=70000), "shared memory"),
                      (dict(num_sms=7), "lowered for 7 SMs"),
                      (dict(slice_rows=4000), "longest instruction list \\(4000 rows\\)")):
        with pytest.raises(ValueError, match=msg):
            _launch(rt, **over)
    with pytest.raises(ValueError, match="params"):
        pk.persistent_decode(rt, tensor((len(pk.SLOTS),), "int32"), hidden=256, inter=512, num_q_heads=4,
                             num_kv_heads=2, head_dim=64, splits=16, slice_rows=40)
    monkeypatch.setattr(pk, "resident_blocks", lambda kernel, threads, shared: 0)
    with pytest.raises(ValueError, match="does not fit one block per SM"):
        _launch(rt)


def test_ring_page_starts_number_each_sms_weight_pages_in_list_order():
    """The pad word of each program row: its first page in the SM's weight ring, counted from 0
    per SM, with the kernel's rule (ceil(2K / 4096) pages a weight row; gate/up two rows an output;
    every other op none). The GPU tests run the kernel on these numbers against the graph path."""
    ops = [Op.QKV, Op.ROPE_APPEND, Op.GATE_UP, Op.LM_HEAD, Op.DOWN, Op.O_PROJ, Op.ATTENTION, Op.QKV]
    t = np.zeros((len(ops), ROW_WORDS), np.int32)
    t[:, 0] = ops
    t[:, 2] = [0, 0, 16, 0, 32, 0, 0, 48]
    t[:, 3] = [16, 1, 32, 16, 48, 16, 1, 64]
    offsets = np.array([0, 2, 2, 7, 8])  # SM 1 has no rows
    starts = pk.ring_page_starts(t, offsets, hidden=2048, inter=8200, q_width=1024)
    # SM 0: QKV 16 rows of 4 KB, then the RoPE row (none); SM 2: gate/up 2 x 16 rows, LM head 16,
    # down 16 rows of 16,400 bytes (5 pages each), then O (K = 1,024: half a page a row) and attention.
    assert starts.tolist() == [0, 16, 0, 32, 48, 128, 144, 0]
    assert starts.dtype == np.int32
    assert pk.ring_page_starts(np.zeros((0, ROW_WORDS), np.int32), np.zeros(3, np.int64), hidden=8, inter=8,
                               q_width=8).tolist() == []
    with pytest.raises(ValueError, match="CSR offsets"):
        pk.ring_page_starts(t, np.array([0, 3]), hidden=2048, inter=8192, q_width=1024)
    with pytest.raises(ValueError, match="inter"):
        pk.ring_page_starts(t, offsets, hidden=2048, inter=0, q_width=1024)
    # The kernel's constants agree with the launcher's.
    ring = (SOURCE_DIR / "persistent_ring.cuh").read_text()
    assert int(re.search(r"#define NRT_RING_PAGE_BYTES (\d+)", ring).group(1)) == pk.RING_PAGE_BYTES
    assert int(re.search(r"kMaxPages = (\d+);", ring).group(1)) == pk.MAX_RING_PAGES
    assert pk.PAGE_WORD == ROW_WORDS - 1


# -- counters across steps -------------------------------------------------------------------
def test_wait_rule_across_the_wraparound():
    total = 7
    for epoch in (0, 1, 2**32 // 7, 2**32 - 1):
        b = C.base(epoch, total)
        assert not C.wait_met(b, epoch, total, 1)  # nothing signalled this step yet
        assert C.wait_met((b + 3) & C.MASK, epoch, total, 3) and not C.wait_met((b + 2) & C.MASK, epoch, total, 3)
        assert C.count_this_step((b + total) & C.MASK, epoch, total) == total
        # A complete previous step never satisfies this step's wait: the stale count reads as 0.
        assert C.count_this_step(C.base(epoch, total), epoch, total) == 0
    # Without the epoch (a reset-free kernel testing the raw count) step 2 would run early.
    assert (C.base(1, total) & C.MASK) >= 3


@pytest.mark.parametrize("epoch0", [0, 2**32 - 2])
def test_device_counters_run_many_steps_without_a_reset(epoch0):
    cfg = _config("qwen3_norms_d128")
    prog = lower(skeleton(cfg), cfg, 7, 16, attn_splits=3)
    totals = [c.target for c in prog.counters]
    dev = C.DeviceCounters(totals, epoch0)
    lists = prog.sm_instructions()
    for step in range(4):
        epoch = dev.epoch
        order = dev.run_step(lists, seed=step)
        assert len(order) == len(prog.instructions)
        assert dev.epoch == (epoch + 1) & C.MASK and dev.ticket == 0
        assert dev.values == [C.base(dev.epoch, t) for t in totals]
    assert dev.epoch == (epoch0 + 4) & C.MASK  # crossed 2**32 for epoch0 = 2**32 - 2
    # An epoch that failed to advance lets the next step's waits pass before any signal.
    stale = C.DeviceCounters(totals, 0)
    stale.run_step(lists)
    stale.epoch = 0
    first_waits = [w for li in lists for ins in li for w in ins.waits]
    assert all(C.wait_met(stale.values[c], 0, totals[c], t) for c, t in first_waits)


# -- the runner hook --------------------------------------------------------------------------
def test_decode_mode_reads_the_environment():
    assert P.decode_mode({}) == "graph"
    assert P.decode_mode({"NEXUSRT_DECODE": " Persistent "}) == "persistent"
    with pytest.raises(ValueError, match="NEXUSRT_DECODE='megakernel': choose one of graph, persistent"):
        P.decode_mode({"NEXUSRT_DECODE": "megakernel"})
    assert P.weight_ring({}) == "0" and P.weight_ring({"NEXUSRT_PERSISTENT_RING": "1"}) == "1"
    assert P.weight_ring({"NEXUSRT_PERSISTENT_RING": " 0 "}) == "0"
    assert P.weight_ring({"NEXUSRT_PERSISTENT_RING": " loader "}) == "loader"
    with pytest.raises(ValueError, match="NEXUSRT_PERSISTENT_RING='yes'"):
        P.weight_ring({"NEXUSRT_PERSISTENT_RING": "yes"})


def test_attention_splits_fill_the_sms():
    assert P.attn_splits(132, 8) == 16 and P.attn_splits(132, 2) == 16 and P.attn_splits(7, 2) == 3
    assert P.attn_splits(4, 8) == 1


def _rt(cc, sms=7):
    rt = FakeRuntime(sm_count=sms)
    rt.profile.compute_capability = cc
    return rt


def test_a_device_that_is_not_sm90_falls_back_with_one_message(capsys, monkeypatch):
    monkeypatch.setattr(P, "_warned", set())
    env = {"NEXUSRT_DECODE": "persistent"}
    cfg = _config("llama_tiny")
    assert P.maybe_build(_rt((9, 0)), cfg, None, None, env={}) is None  # graph: nothing built
    for _ in range(2):
        assert P.maybe_build(_rt((8, 0)), cfg, None, None, env=env) is None
    err = capsys.readouterr().err
    assert err.count("needs an sm_90 GPU; this one is sm_80; decoding with the graph path") == 1


@pytest.mark.parametrize("over, msg", [(dict(head_dim=96), "head_dim"), (dict(sliding_window=64), "sliding window"),
                                       (dict(num_attention_heads=32, num_key_value_heads=2), "up to 8")])
def test_forcing_persistent_on_a_shape_it_cannot_take_is_a_clear_error(over, msg):
    import dataclasses

    cfg = dataclasses.replace(_config("llama_tiny"), **over)
    with pytest.raises(ModelError, match=f"NEXUSRT_DECODE=persistent cannot run .*{msg}.*unset NEXUSRT_DECODE"):
        P.maybe_build(_rt((9, 0)), cfg, None, None, env={"NEXUSRT_DECODE": "persistent"})


def _gpu_cfg(variant):
    """The CPU tests' variants at head dims the CUDA kernels take (64; qwen3 128)."""
    import dataclasses

    cfg = _config(variant)
    return cfg if cfg.head_dim in pk.HEAD_DIMS else dataclasses.replace(cfg, head_dim=64)


@pytest.mark.parametrize("variant", ["llama_tiny", "qwen2_bias", "qwen3_norms_d128"])
def test_persistent_decode_uploads_the_program_and_points_at_the_runner_buffers(variant, cpu_rt, monkeypatch,
                                                                               no_occupancy_query):
    from nexusrt.backends.cuda.buffers import RunnerBuffers

    monkeypatch.setattr(pk, "resident_blocks", lambda kernel, threads, shared: 1)
    cfg = _gpu_cfg(variant)
    rt = _rt((9, 0), sms=7)
    weights, buffers = _device_weights(cfg), None
    try:
        buffers = RunnerBuffers(rt, cfg, 64, 64, positions=64)
        dec = P.maybe_build(rt, cfg, weights, buffers, env={"NEXUSRT_DECODE": "persistent"})
        try:
            for sample in (True, False):
                prog, spec, counters, epoch = dec.program(sample)
                assert prog.num_sms == 7 and prog.attn_splits == 3 and spec.grid == (7, 1, 1) and spec.cooperative
                has_finish = any(i.op == Op.SAMPLE_FINISH for i in prog.instructions)
                assert has_finish == sample
                params = spec.args[0].to_numpy().view(np.uint64)
                slot = lambda n: int(params[pk.SLOTS.index(n)])  # noqa: E731
                assert slot("x") == buffers.hidden.ptr and slot("ring") == buffers.ring.ptr
                assert slot("state") == buffers.state.ptr and slot("counters") == counters.ptr
                assert slot("splits") == 3 and slot("hq") == cfg.num_attention_heads
                # The graph path's SampleParams struct: one captured launch follows every request's parameters.
                assert slot("sample_params") == buffers.sampler.params.ptr
                table, offsets = prog.pack()
                (uploaded,) = [t.to_numpy() for t in dec.owned if t.is_live and t.ptr == slot("program")]
                uploaded = uploaded.reshape(table.shape)
                assert np.array_equal(uploaded[:, :pk.PAGE_WORD], table[:, :pk.PAGE_WORD])
                assert np.array_equal(uploaded[:, pk.PAGE_WORD], pk.ring_page_starts(
                    table, offsets, hidden=cfg.hidden_size, inter=cfg.intermediate_size, q_width=cfg.q_size))
                assert np.count_nonzero(counters.to_numpy()) == 0 and np.count_nonzero(epoch.to_numpy()) == 0
                assert len(offsets) == 8 and int(offsets[-1]) == len(table)
            layers = dec.layers.to_numpy().view(np.uint64).reshape(cfg.num_hidden_layers, len(pk.LAYER_SLOTS))
            assert layers[1, pk.LAYER_SLOTS.index("k_pool")] == buffers.k_pools[1].ptr
            for name in ("qkv_bias", "q_norm", "k_norm"):  # what the graph path's launchers get, or null
                t = getattr(weights.layers[0], name)
                assert layers[0, pk.LAYER_SLOTS.index(name)] == (0 if t is None else t.ptr)
            assert (weights.layers[0].q_norm is not None) == (variant == "qwen3_norms_d128")
            (st,) = dec.stages(True)
            assert st.name == "decode.persistent.sample" and st.kernel is dec.program(True)[1]
            for source, name, _ in rt.asked:
                if source in (pk.SOURCE, pk.LOADER_SOURCE):
                    assert name.encode() in compile_file(source, "sm_90a").cubin
        finally:
            dec.free()
    finally:
        if buffers is not None:
            buffers.free()
        weights.free()


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_the_presets_instruction_lists_fit_the_shared_memory(name):
    """The runner's programs (16-row tiles, min(16, 132 // Hkv) splits) keep each SM's list in
    shared memory beside the staged input: the launcher would refuse them otherwise."""
    from nexusrt.backends.cuda.megakernel.lower import lower, skeleton
    from nexusrt.backends.cuda.persistent import TILE_ROWS, attn_splits
    from nexusrt.models.presets import preset

    cfg = preset(name)
    prog = lower(skeleton(cfg), cfg, 132, TILE_ROWS, attn_splits=attn_splits(132, cfg.num_key_value_heads))
    _, offsets = prog.pack()
    rows = int(np.diff(offsets).max())
    shared = pk.shared_bytes(cfg.hidden_size, cfg.intermediate_size, cfg.q_size, rows)
    assert rows > 100 and shared <= pk.SMEM_OPTIN_LIMIT - 40 * 1024  # room for the static ~38 KB


@pytest.mark.parametrize("name, value, match", [("NEXUSRT_DECODE", "megakernel", "choose one of graph"),
                                                ("NEXUSRT_PERSISTENT_PROFILE", "yes", "1 records each"),
                                                ("NEXUSRT_PERSISTENT_RING", "on", "1 streams the weights")])
def test_the_runner_refuses_a_bad_decode_switch_before_any_upload(monkeypatch, name, value, match):
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    monkeypatch.setenv(name, value)
    rt = FakeRuntime()
    with pytest.raises(ValueError, match=match):
        CudaRunner(load_model("synthetic:tiny"), rt, max_context=64)
    assert rt.asked == []  # no kernel asked for: refused before the weights or any graph


@pytest.mark.parametrize("words, text", [
    ([0, 0, 0, 0, 0], None),
    ([4, 17, 9, 2, 3], "SM 3 stuck at program row 17: counter 9 at 2 of 3 this step"),
    ([6, 1234, -3, 5, 31], "SM 5 stuck waiting for weight-ring page 1234 (slot 5, copy 31)"),
    ([3, 77, -4, 9, 2], "SM 2's ring loader stuck before page 77: slot 9's copy 1 was never read"),
    ([-2, 40, 99, 0, 0], "SM 1 found opcode 99 at program row 40"),
    ([-8, 612, -1, 0, 0], "SM 7's instruction list has 612 rows, more than the shared memory was sized for"),
])
def test_the_fault_record_names_what_the_kernel_was_stuck_on(words, text):
    """The debug words a trapping kernel leaves (persistent_decode.cuh wait_row, the unknown-opcode
    default, the list-length check with -1 in the third word; persistent_ring.cuh ring_wait with -3,
    ring_wait_read, the loader's, with -4)
    read back as one sentence."""
    from types import SimpleNamespace

    fake = SimpleNamespace(debug=SimpleNamespace(array=np.array(words + [0, 0, 0], np.int32)))
    assert P.PersistentDecode.fault_record(fake) == text
