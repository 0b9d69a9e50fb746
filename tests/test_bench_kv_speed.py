"""``nexusrt-bench --stage kv``, speed half: its arithmetic on fake measurements (floors, rates,
ratios, targets), every skip and refusal path, ``--kv-contexts`` parsing, the CPU backend's
answer; on a GPU, the real half on the tiny synthetic model."""

from __future__ import annotations

import json
import math

import pytest

from nexusrt.bench import kv_speed, kv_speed_table
from nexusrt.bench.kv_speed import DecodePlan
from nexusrt.bench.main import main
from nexusrt.kvcache.blocks import blocks_for
from nexusrt.kvcache.tiers import KvBudgetError, block_bytes
from nexusrt.models.presets import preset

CFG = preset("llama-3.1-8b")
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, every layer, bf16
HBM, PINNED = 4.0e12, 50e9


class FakeProbe:
    """Measurements as a CudaKvProbe would return them, chosen by hand."""

    pinned_copy = {"bytes": 1 << 30, "reps": 5}

    def __init__(self, too_big=(), refuse_host=False, refuse_pruned=None):
        self.too_big, self.refuse_host, self.refuse_pruned = too_big, refuse_host, refuse_pruned
        self.calls = []

    def hbm_bandwidth(self):
        return HBM

    def pinned_rate(self):
        return PINNED

    def fits(self, context):
        return f"synthetic:llama-3.1-8b does not fit at {context}" if context in self.too_big else None

    def all_device(self, plan, evicted, keep, restore=True):
        self.calls.append(("all_device", plan.context, evicted, keep) + (() if restore else ("no restore",)))
        out = {"kv_blocks": blocks_for(plan.context + 63), "recompute_s": [0.30, 0.10, 0.20] if restore else [],
               "decode_ms": [6.0, 5.0, 5.5]}
        if keep is not None:
            out["pruned"] = {"unpruned_ms": [5.0, 5.2, 5.1]}
            if self.refuse_pruned:
                out["pruned"]["pruned_refused"] = self.refuse_pruned
            else:
                out["pruned"]["pruned_ms"] = [5.3, 5.4, 5.6]
        return out

    def half_host(self, plan, device_blocks, reserve_blocks=0, prefetch=False):
        self.calls.append(("half_host", plan.context, device_blocks, reserve_blocks) + (("prefetch",) if prefetch else ()))
        if self.refuse_host:
            raise KvBudgetError("the host tier would need 9 bytes of pinned memory")
        host = blocks_for(plan.context + 63) - device_blocks
        unit = block_bytes(CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim)
        tiers = {"blocks_device": device_blocks, "blocks_host": host, "host_bytes": host * unit}
        if not reserve_blocks:
            return {"decode_ms": [50.0, 48.0, 49.0], "tiers": tiers}
        if prefetch:  # every host block moved as the fill ended: no post moved any
            tiers.update(blocks_reserve=reserve_blocks, ring_slots=4096, faults_posted=3, faults_serviced=0,
                         faults_overflow=0, faults_left=0, bytes_moved=host * unit, blocks_prefetched=host,
                         move_ms=45.0)
            return {"decode_ms": [6.0, 6.1, 6.1], "warmup_ms": 10.0, "tiers": tiers, "host_entries_timed": 0,
                    "flush_s": 0.001, "flush_bytes": 0, "prefetch_s": 0.046}
        tiers.update(blocks_reserve=reserve_blocks, ring_slots=4096, faults_posted=host + 5, faults_serviced=host,
                     faults_overflow=0, faults_left=5, bytes_moved=host * unit, blocks_prefetched=0, move_ms=50.0)
        return {"decode_ms": [6.0, 6.2, 6.1], "warmup_ms": 40.0, "tiers": tiers, "host_entries_timed": 0,
                "flush_s": 0.002, "flush_bytes": 0}


def _measure(probe, contexts=(32768,), keep=4096, cfg=CFG, runs=3):
    return kv_speed.measure(probe, cfg, "synthetic:llama-3.1-8b", list(contexts), runs, keep)


def test_the_decode_plan_fills_the_context_exactly():
    plan = DecodePlan(32768, runs=3)
    assert plan.prefill_to == 32768 - 4 * 32
    # timed steps at positions prefill_to + 32 .. 32767 read 1 more token than their position
    timed = range(plan.prefill_to + 32, 32768)
    assert len(timed) == 3 * 32 and plan.mean_context == sum(p + 1 for p in timed) / len(timed)


def test_figures_from_fake_measurements():
    probe = FakeProbe()
    s = _measure(probe)
    row = s["contexts"][0]
    mean = DecodePlan(32768, 3).mean_context
    weights = kv_speed.bytes_per_token(CFG, 0)["weights"]
    a = row["all_device"]
    assert a["ms_per_token"] == 5.5 and a["ms_per_token_runs"] == [6.0, 5.0, 5.5]
    assert a["floor_ms"] == pytest.approx((weights + KV_PER_TOKEN * mean) / HBM * 1e3)
    assert a["fraction_of_floor"] == pytest.approx(a["floor_ms"] / 5.5)
    b = row["fault_ring"]
    assert b["ms_per_token"] == 6.1 and b["warmup_ms_per_token"] == 40.0 and b["blocks_reserve"] == 1024
    assert b["over_all_device"] == pytest.approx(6.1 / 5.5) and b["warmup_over_all_device"] == pytest.approx(40 / 5.5)
    moved = 1024 * KV_PER_TOKEN * 16  # the host half, in 50 ms of copies: 42.9 GB/s, 85.9% of 50 GB/s
    assert b["bytes_moved"] == moved and b["move_ms"] == 50.0
    assert b["flush_bytes"] == 0 and b["flush_ms"] == pytest.approx(2.0)  # the moves landed during the steps
    assert b["move_bytes_s"] == pytest.approx(moved / 0.05) and b["move_of_pinned"] == pytest.approx(moved / 0.05 / PINNED)
    assert b["move_target"] == "met"
    assert b["faults_serviced"] == 1024 and b["faults_left"] == 5 and "reserve as large as the host half" in b["measures"]
    assert b["host_entries_timed"] == 0 and "ends once they are moved in" in b["measures"]
    assert ("half_host", 32768, blocks_for(32768 + 63) - 1024, 1024) in probe.calls

    f = row["prefetched"]  # (b) with prefetch: its warm-up against (b)'s
    assert ("half_host", 32768, blocks_for(32768 + 63) - 1024, 1024, "prefetch") in probe.calls
    assert f["ms_per_token"] == 6.1 and f["warmup_ms_per_token"] == 10.0 and f["blocks_prefetched"] == 1024
    assert f["warmup_over_fault_ring_warmup"] == pytest.approx(10 / 40) and f["faults_serviced"] == 0
    assert f["warmup_over_all_device"] == pytest.approx(10 / 5.5) and f["host_entries_timed"] == 0

    c = row["host_zero_copy"]
    host = 16384 * KV_PER_TOKEN  # exactly the evicted half: 1,024 whole blocks
    assert c["blocks_host"] == 1024 and c["host_tokens"] == 16384 and c["host_bytes_per_token"] == host
    assert ("half_host", 32768, blocks_for(32768 + 63) - 1024, 0) in probe.calls
    assert c["device_bytes_per_token"] == pytest.approx(weights + KV_PER_TOKEN * mean - host)
    assert c["floor_ms"] == pytest.approx(((weights + KV_PER_TOKEN * mean - host) / HBM + host / PINNED) * 1e3)
    assert c["host_bytes_s"] == pytest.approx(host / 0.049)
    assert c["of_pinned"] == pytest.approx(host / 0.049 / PINNED) and c["link_target"] == "met"  # 87.6%
    assert c["over_all_device"] == pytest.approx(49 / 5.5)
    assert c["floor_over_all_device_floor"] == pytest.approx(c["floor_ms"] / a["floor_ms"])

    d = row["restore"]
    assert d["evicted_tokens"] == 16384 and d["evicted_bytes"] == host
    assert d["recompute_ms"] == pytest.approx(200.0) and d["copy_back_ms"] == pytest.approx(host / PINNED * 1e3)
    assert d["recompute_over_copy"] == pytest.approx(200.0 / d["copy_back_ms"])

    e = row["pruned"]
    assert e["keep"] == 4096 and e["positions"] == [32768 - 32, 32767]
    assert e["unpruned_ms_per_token"] == 5.1 and e["ms_per_token"] == 5.4
    assert e["over_unpruned"] == pytest.approx(5.4 / 5.1) and e["target"] == "met"

    t = s["targets"]
    h = t["host_over_device_32k"]
    assert h["ratio"] == pytest.approx(49 / 5.5) and h["verdict"] == "missed" and h["target"] == 1.5
    assert h["floor_ratio"] == pytest.approx(c["floor_over_all_device_floor"])
    assert "50.0 GB/s" in h["note"] and "floor of (c) itself" in h["note"]
    r, b = t["fault_ring_over_device_32k"], row["fault_ring"]
    assert r["ratio"] == pytest.approx(b["over_all_device"]) and r["target"] == 1.5
    assert r["verdict"] == "met" and r["host_entries_timed"] == 0  # 6.1 / 5.5 = 1.11x
    assert r["warmup_ratio"] == pytest.approx(b["warmup_over_all_device"])
    assert t["host_link"]["verdict"] == "met" and t["pruned_like_kept"]["verdict"] == "met"
    # The verdict from (f)'s copies, alone on the link (2,147 MB in 45 ms: 95.4%); (b)'s shared ones beside it.
    assert t["fault_moves"]["verdict"] == "met" and t["fault_moves"]["of_pinned"] == [f["move_of_pinned"]]
    assert f["move_of_pinned"] == pytest.approx(moved / 0.045 / PINNED) and f["move_target"] == "met"
    assert t["fault_moves"]["shared_of_pinned"] == [b["move_of_pinned"]]
    assert s["hbm_read_bytes_s"] == HBM and s["pinned_h2d_bytes_s"] == PINNED and s["runs"] == 3


def test_slow_link_and_slow_pruned_rows_miss_their_targets():
    probe = FakeProbe()
    probe.half_host = lambda plan, device_blocks, reserve_blocks=0, prefetch=False: FakeProbe.half_host(
        probe, plan, device_blocks, reserve_blocks, prefetch) if reserve_blocks else {"decode_ms": [100.0], "tiers": {
            "blocks_device": device_blocks, "blocks_host": 1024, "host_bytes": 16384 * KV_PER_TOKEN}}
    slow = FakeProbe.all_device

    def all_device(plan, evicted, keep, restore=True):
        out = slow(probe, plan, evicted, keep, restore)
        out["pruned"]["pruned_ms"] = [6.0, 6.0, 6.0]  # 1.18x the unpruned 5.1
        return out

    probe.all_device = all_device
    s = _measure(probe)
    c, e = s["contexts"][0]["host_zero_copy"], s["contexts"][0]["pruned"]
    assert c["of_pinned"] == pytest.approx(16384 * KV_PER_TOKEN / 0.1 / PINNED) and c["link_target"] == "missed"
    assert e["target"] == "missed"
    assert s["targets"]["host_link"]["verdict"] == "missed" and s["targets"]["pruned_like_kept"]["verdict"] == "missed"


def test_skips_and_refusals_are_reported_not_measured():
    tiny = preset("tiny")  # 2,048 positions
    probe = FakeProbe(too_big=(1024,))
    s = kv_speed.measure(probe, tiny, "synthetic:tiny", [512, 1024, 4096], 3, 4096)
    small, big, past = s["contexts"]
    assert "holds at most 2048 positions" in past["skipped"] and "does not fit" in big["skipped"]
    assert [c[1] for c in probe.calls if c[0] == "all_device"] == [512]  # skipped contexts cost nothing
    assert ("all_device", 512, 256, None) in probe.calls  # 4,096 kept slots: nothing to prune at 512
    assert "nothing to prune" in small["pruned"]["skipped"]
    t = s["targets"]
    assert "not measured" in t["host_over_device_32k"]["skipped"] and t["pruned_like_kept"]["verdict"] is None

    s = _measure(FakeProbe(refuse_host=True, refuse_pruned="KV pruning runs on the CPU backend only so far"))
    row = s["contexts"][0]
    assert "host tier refused" in row["host_zero_copy"]["skipped"] and "all_device" in row
    assert "host tier refused" in s["targets"]["host_over_device_32k"]["skipped"]
    assert "refused" in s["targets"]["fault_ring_over_device_32k"]["skipped"]
    assert s["targets"]["host_link"]["verdict"] is None
    e = row["pruned"]
    assert "refused position != start" in e["pruned_skipped"] and "ms_per_token" not in e
    assert e["unpruned_ms_per_token"] == 5.1 and s["targets"]["pruned_like_kept"]["verdict"] is None
    assert "fault reserve refused" in row["fault_ring"]["skipped"]
    assert "fault reserve refused" in row["prefetched"]["skipped"]

    # Only the ring's reserve refused: (c) keeps its measured figures.
    probe = FakeProbe()
    plain = probe.half_host

    def reserve_refused(plan, device_blocks, reserve_blocks=0, prefetch=False):
        if reserve_blocks:
            raise KvBudgetError("kv_fault_reserve of 9 blocks exceeds the host tier")
        return plain(plan, device_blocks, reserve_blocks)

    probe.half_host = reserve_refused
    row = _measure(probe)["contexts"][0]
    assert row["host_zero_copy"]["ms_per_token"] == 49.0 and "exceeds the host tier" in row["fault_ring"]["skipped"]


def test_the_table_says_what_was_skipped_and_what_the_fault_ring_did():
    s = _measure(FakeProbe(refuse_pruned="KV pruning runs on the CPU backend only so far"), contexts=(8192, 32768))
    s.update(backend="cuda", device="NVIDIA H200", profile="h200", model="synthetic:llama-3.1-8b")
    s["contexts"].append({"context": 131072, "skipped": "does not fit: it needs 200 GiB"})
    text = kv_speed_table.render(s)
    assert "(b) half on host, fault ring  6.100" in text and "1.11x" in text
    assert "context 32,768 (b): decode with a reserve" in text and "faults posted 1,029, serviced 1,024" in text
    assert "ms/token including the moving" in text and "timed runs began with 0 of 1,024 host blocks still read" in text
    assert "context 131,072 skipped: does not fit" in text
    assert "refused position != start" in text and "refused" in text
    assert "4,000 GB/s" in text and "50.0 GB/s" in text and "median of 3 runs of 32 steps" in text
    assert "target (c) / (a) at 32,768 <= 1.5x (8B shape): 8.91x, missed; floor ratio" in text
    assert "target (b) / (a) at 32,768 <= 1.5x (8B shape): 1.11x, met — timed once the warm-up's faults" in text
    assert "the warm-up run, moving included, was 7.27x" in text
    assert "2,147 MB moved; the copies took 50.000 ms on the control stream (sharing the link with the steps' " \
           "zero-copy reads of the blocks not moved yet), 42.9 GB/s (85.9% of pinned)" in text
    assert "the copies took 45.000 ms on the control stream (the link to themselves), 47.7 GB/s (95.4% of pinned)" in text
    assert "moved into the reserve as it ends, the first step waiting 46.000 ms for them; warm-up run" in text
    assert "(the fault ring's copies alone on the link: the prefetched rows, else the fault-ring rows) >= 80% of the " \
           "pinned rate: missed (23.9%, 95.4%); beside the steps' zero-copy reads of the same blocks (the fault-ring " \
           "rows): 21.5%, 85.9%" in text  # the fake's 8k copies take as long as its 32k ones
    assert "the warm-up's closing flush took 2.000 ms and moved 0 MB" in text
    assert "(f) as (b), prefetched" in text and "context 32,768 (f): the fill's sealed host blocks moved" in text
    assert "warm-up run 10.000 ms/token including the moving (1.82x (a)) = 0.25x (b)'s warm-up" in text
    assert "1,024 blocks prefetched, 0 moved by posts" in text
    assert "{" not in text and "None" not in text
    assert kv_speed_table.render({"skipped": "needs the CUDA backend"}) == "speed: needs the CUDA backend"


@pytest.mark.parametrize("text, runs, message", [
    ("abc", 3, "comma-separated positive integers"),
    ("8192,", 3, "comma-separated positive integers"),
    ("0", 3, "must be >= 1"),
    ("-8192", 3, "must be >= 1"),
    ("8192,8192", 3, "names a context twice"),
    ("8200", 3, "multiples of 32"),
    ("224", 3, "must be >= 256"),
    ("96", 1, "must be >= 128"),
])
def test_bad_contexts_are_refused_clearly(text, runs, message):
    with pytest.raises(ValueError, match="--kv-contexts") as err:
        kv_speed.parse_contexts(text, runs)
    assert message in str(err.value)


def test_contexts_parse_sorted_with_the_defaults():
    assert kv_speed.parse_contexts(None, 3) == [8192, 32768, 131072]
    assert kv_speed.parse_contexts(" 512, 256", 3) == [256, 512]


@pytest.mark.parametrize("argv, message", [
    (["--kv-contexts", "8k"], "--kv-contexts takes comma-separated positive integers"),
    (["--kv-contexts", "8192", "--runs", "0"], "--runs and --kv-keep must be >= 1"),
    (["--kv-keep", "0"], "--runs and --kv-keep must be >= 1"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    assert main(["--stage", "kv", "--backend", "cpu", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_on_the_cpu_the_speed_half_needs_cuda_and_the_quality_half_runs(capsys):
    assert main(["--stage", "kv", "--backend", "cpu", "--json", "--kv-window", "64", "--tokens", "64"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "needs the CUDA backend" in r["speed"]["skipped"] and "this run's backend is cpu" in r["speed"]["skipped"]
    assert [q["policy"] for q in r["quality"]] == ["full", "sink-window", "sink-window", "h2o", "h2o"]
    assert main(["--stage", "kv", "--backend", "cpu", "--kv-part", "speed"]) == 0
    out = capsys.readouterr().out
    assert "quality: skipped (--kv-part speed)" in out and "speed: needs the CUDA backend" in out


def _numbers(x):
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


@pytest.mark.gpu
def test_the_speed_half_on_the_tiny_model_gives_finite_ordered_figures(capsys):
    argv = ["--stage", "kv", "--backend", "cuda", "--model", "synthetic:tiny", "--kv-part", "speed",
            "--kv-contexts", "512,256", "--kv-keep", "64", "--runs", "2", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)["speed"]
    assert all(math.isfinite(n) and n >= 0 for n in _numbers(s))
    assert s["hbm_read_bytes_s"] > s["pinned_h2d_bytes_s"] > 1e9
    rows = s["contexts"]
    assert [r["context"] for r in rows] == [256, 512] and not any("skipped" in r for r in rows)
    for r in rows:
        a, c, d, e = r["all_device"], r["host_zero_copy"], r["restore"], r["pruned"]
        assert len(a["ms_per_token_runs"]) == 2 and a["ms_per_token"] > 0
        assert r["context"] / 2 < a["mean_context"] < r["context"]
        assert c["host_tokens"] == r["context"] // 2 == d["evicted_tokens"]
        assert c["floor_ms"] > a["floor_ms"] and c["ms_per_token"] > 0 and 0 < c["of_pinned"]
        assert d["recompute_ms"] > 0 and d["copy_back_ms"] > 0
        assert e["unpruned_ms_per_token"] > 0
        # Until the CUDA batch runner honours Rows.position != start it refuses the pruned row.
        assert e.get("ms_per_token", 0) > 0 or "refused" in e["pruned_skipped"]
    assert rows[1]["host_zero_copy"]["host_bytes_per_token"] == 2 * rows[0]["host_zero_copy"]["host_bytes_per_token"]
    assert rows[1]["all_device"]["floor_ms"] > rows[0]["all_device"]["floor_ms"]
    assert "not measured" in s["targets"]["host_over_device_32k"]["skipped"]
    assert main(argv[:-1]) == 0  # the table renders the same figures
    assert "(c) half on host, zero-copy" in capsys.readouterr().out


def test_progress_names_each_row_as_it_lands_then_the_context():
    lines = []
    kv_speed.measure(FakeProbe(), CFG, "synthetic:llama-3.1-8b", [8192, 32768], 3, 4096, progress=lines.append)
    assert len(lines) == 16  # per context: (a), (c)'s fill and figure, (b)'s, (f)'s, then the summary
    assert lines[0].startswith("context 8192: (a) 5.500 ms/token (")
    plan = kv_speed.DecodePlan(8192, 3)
    assert lines[1] == (f"context 8192: (c) filling {plan.prefill_to:,} tokens in HBM, then the oldest 4,096 "
                        "copied to the host tier")
    assert lines[2].startswith("context 8192: (c) 49.000 ms/token (")
    assert lines[3].startswith("context 8192: (b) filling ") and lines[4].startswith("context 8192: (b) 6.100 ms/token, warm-up 40.000 (")
    assert lines[5].startswith("context 8192: (f) filling ")
    assert lines[6].startswith("context 8192: (f) 6.100 ms/token, warm-up 10.000 (")
    assert lines[7].startswith("context 8192: all_device 5.500 ms/token; host_zero_copy 49.000 ms/token; "
                               "fault_ring 6.100 ms/token; prefetched 6.100 ms/token; pruned 5.400 ms/token (")
    assert lines[8].startswith("context 32768: (a)")


def test_kv_rows_measure_only_what_is_asked_and_say_so():
    assert kv_speed.parse_rows(None) == {"b", "c", "d", "e", "f"} and kv_speed.parse_rows("a, C") == {"c"}
    for bad in ("x", "b,z", "", ","):
        with pytest.raises(ValueError, match="--kv-rows takes a comma-separated subset of a,b,c,d,e,f"):
            kv_speed.parse_rows(bad)
    probe = FakeProbe()
    s = kv_speed.measure(probe, CFG, "synthetic:llama-3.1-8b", [131072], 1, 4096, rows_asked=frozenset({"c"}))
    assert [c[0] for c in probe.calls] == ["all_device", "half_host"]  # no reserve run, no pruned, no restore
    assert probe.calls[0] == ("all_device", 131072, 65536, None, "no restore")
    assert probe.calls[1][3] == 0  # (c): no fault reserve
    row = s["contexts"][0]
    assert "ms_per_token" in row["all_device"] and "ms_per_token" in row["host_zero_copy"]
    for key in ("fault_ring", "prefetched", "restore", "pruned"):
        assert row[key] == {"skipped": "not asked for (--kv-rows)"}
    assert s["targets"]["fault_ring_over_device_32k"]["skipped"]  # 32k itself was not measured
    s.update(backend="cuda", device="NVIDIA H200", profile="h200", model="synthetic:llama-3.1-8b")
    text = kv_speed_table.render(s)
    assert "context 131,072 (b): not asked for (--kv-rows)" in text
    assert "context 131,072 (d): not asked for (--kv-rows)" in text
    assert "131,072  (c) half on host, zero-copy" in text and "{" not in text
    assert "(f)" not in text  # a row not asked for has no line and no note
