"""Stage contracts and task-graph validation: pure logic, no runtime, no driver."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nexusrt.scheduler import Placeholder, TaskGraph, stage
from nexusrt.scheduler.hazards import tensor_edges


class FakeTensor:
    """Just what the scheduler looks at: an address range on a device."""

    def __init__(self, ptr: int, nbytes: int, shape=(4,), dtype="f32", device="cuda:0"):
        self.ptr, self.nbytes, self.shape, self.dtype, self.device = ptr, nbytes, shape, dtype, device


class FakeLaunchSpec:
    grid = (1, 1, 1)

    def launch(self, stream=None):
        raise AssertionError("a CUDA launch must not run in these tests")


class FakeKernel:
    def __init__(self):
        self.packed = None

    def pack(self, *values):
        self.packed = values
        return ("pack", values)

    def launch(self, *a, **k):
        raise AssertionError("no launches here")


def order_of(stages, **kw):
    return TaskGraph(stages).validate(**kw).order


# -- contracts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"token_budget": -1}, ["'s'", "token_budget", "-1"]),
    ({"sm_footprint_mb": -0.5}, ["'s'", "sm_footprint_mb", "-0.5"]),
    ({"sm_footprint_mb": float("nan")}, ["'s'", "sm_footprint_mb"]),
    ({"stream": "gpu0"}, ["'s'", "gpu0", "compute"]),
    ({"grid": (1,)}, ["'s'", "no kernel"]),
    ({"kernel": 42}, ["'s'", "int"]),
])
def test_bad_stage_arguments_name_the_stage(kwargs, words):
    with pytest.raises(ValueError) as info:
        stage("s", **kwargs)
    for w in words:
        assert w in str(info.value)


def test_kernel_with_grid_is_packed_once_into_a_launch_spec():
    k = FakeKernel()
    s = stage("k", kernel=k, grid=(4, 2), block=128, args=(1, 2.5), shared_mem_bytes=256)
    assert s.kind == "launch"
    assert s.kernel.grid == (4, 2, 1) and s.kernel.block == (128, 1, 1) and s.kernel.shared == 256
    assert k.packed == (1, 2.5) and s.kernel.args == ("pack", (1, 2.5))
    with pytest.raises(ValueError, match="'k2'.*grid= and block="):
        stage("k2", kernel=FakeKernel(), grid=4)
    with pytest.raises(ValueError, match="'k3'.*LaunchSpec carries"):
        stage("k3", kernel=FakeLaunchSpec(), grid=4)


def test_callable_gets_stream_only_when_it_asks():
    assert stage("a", kernel=lambda x: x, args=(1,)).wants_stream is False
    assert stage("b", kernel=lambda x, stream=None: x, args=(1,)).wants_stream is True


def test_split_tokens_into_budget_chunks():
    s = stage("prefill", token_budget=512)
    assert s.split(1300) == [(0, 512), (512, 512), (1024, 276)]
    assert s.split(512) == [(0, 512)]
    assert stage("any").split(10_000) == [(0, 10_000)]
    with pytest.raises(ValueError, match="'zero'.*token_budget=0"):
        stage("zero", token_budget=0).split(3)


# -- validation -----------------------------------------------------------------------------------
def test_duplicate_names():
    with pytest.raises(ValueError, match="'a' appears 2 times"):
        TaskGraph([stage("a"), stage("b"), stage("a")]).validate()


def test_unknown_dependency_names_both():
    g = TaskGraph([stage("a"), stage("b", depends_on=["ghost"])])
    with pytest.raises(ValueError, match="'b' depends on 'ghost'"):
        g.validate()
    assert g.validate(known={"ghost"}).items[1].external == ["ghost"]


def test_cycle_is_spelled_out():
    g = TaskGraph([stage("a", depends_on=["c"]), stage("b", depends_on=["a"]),
                   stage("c", depends_on=["b"]), stage("d")])
    with pytest.raises(ValueError) as info:
        g.validate()
    msg = str(info.value)
    assert "cycle" in msg and "'d'" not in msg
    assert "'a' -> 'b' -> 'c' -> 'a'" in msg
    assert "'b' depends_on 'a'" in msg


def test_cycle_through_a_tensor_names_the_reason():
    t = FakeTensor(0x1000, 64)
    g = TaskGraph([stage("w", outputs=[t], depends_on=["r"]), stage("r", inputs=[t])])
    with pytest.raises(ValueError, match=r"cycle.*'r' reads tensor shape=\(4,\) dtype=f32 written by 'w'"):
        g.validate()


def test_self_dependency_is_a_cycle():
    with pytest.raises(ValueError, match="'a' -> 'a'"):
        TaskGraph([stage("a", depends_on="a")]).validate()


def test_placeholder_nobody_produces():
    h = Placeholder("hidden")
    with pytest.raises(ValueError, match="'use' reads placeholder 'hidden', which no stage produces"):
        TaskGraph([stage("use", inputs=[h])]).validate()


def test_freed_tensor_is_not_provided():
    t = FakeTensor(0x1000, 64)
    t.is_live = False
    with pytest.raises(ValueError, match="'use' reads freed tensor"):
        TaskGraph([stage("use", inputs=[t])]).validate()


def test_footprint_larger_than_the_device_gives_both_numbers():
    g = TaskGraph([stage("small", sm_footprint_mb=1), stage("big", sm_footprint_mb=96)])
    with pytest.raises(ValueError) as info:
        g.validate(free_bytes=64 << 20, free_source="test arena")
    msg = str(info.value)
    assert "'big'" in msg and str(96 << 20) in msg and str(64 << 20) in msg and "test arena" in msg
    assert g.validate(free_bytes=96 << 20).order == ["small", "big"]


def test_budget_mutated_after_creation_is_caught_at_validation():
    s = stage("s", token_budget=8)
    s.token_budget = -3
    with pytest.raises(ValueError, match="'s': token_budget must be non-negative"):
        TaskGraph([s]).validate()


def test_cuda_kernel_on_cpu_backend():
    with pytest.raises(ValueError, match="'gemv' launches a CUDA kernel.*CPU"):
        TaskGraph([stage("gemv", kernel=FakeLaunchSpec())]).validate(backend="cpu")


# -- ordering -------------------------------------------------------------------------------------
def test_placeholder_consumer_listed_before_producer_runs_after_it():
    h = Placeholder("h")
    assert order_of([stage("consume", inputs=[h]), stage("produce", outputs=[h])]) == ["produce", "consume"]


def test_read_after_write_write_after_read_and_in_place_chain():
    x = FakeTensor(0x10000, 256)
    y = FakeTensor(0x20000, 256)
    stages = [stage(f"layer{i}", inputs=[x], outputs=[x]) for i in range(4)]
    stages.insert(2, stage("peek", inputs=[x], outputs=[y], priority=10))
    # The in-place residual chain keeps program order; the reader sits between its neighbours.
    assert order_of(stages) == ["layer0", "layer1", "peek", "layer2", "layer3"]
    edges = {(u, v) for u, v, _ in tensor_edges(stages)}
    assert (2, 3) in edges  # layer2 overwrites what peek reads: write after read


def test_views_that_overlap_are_ordered_and_disjoint_ones_are_not():
    base = np.arange(64, dtype=np.float32)
    # Overlapping ranges merge into one resource (conservative), so keep right clear of both.
    left, right, middle = base[:16], base[32:48], base[8:24]
    g = [stage("write_left", outputs=[left]), stage("read_right", inputs=[right], priority=5),
         stage("read_middle", inputs=[middle], priority=5)]
    p = TaskGraph(g).validate()
    deps = {it.name: [p.items[d].name for d in it.deps] for it in p.items}
    assert deps["read_right"] == []
    assert deps["read_middle"] == ["write_left"]
    assert p.order[0] == "read_right"  # ready at once and higher priority


def test_priority_breaks_ties_then_insertion_order():
    stages = [stage("a"), stage("b", priority=1), stage("c"), stage("d", priority=1)]
    assert order_of(stages) == ["b", "d", "a", "c"]


def test_cross_stream_dependencies_are_marked_for_events():
    t = FakeTensor(0x5000, 64)
    p = TaskGraph([stage("upload", outputs=[t], stream="h2d"),
                   stage("compute", inputs=[t]),
                   stage("after", depends_on=["compute"])]).validate()
    up, comp, after = p.items
    assert comp.cross == [0] and up.signals
    assert after.cross == [] and not comp.signals  # same stream: stream order suffices
    assert p.streams == ["h2d", "compute"]
    rows = p.rows()
    assert rows[1]["after"] == ["upload"] and rows[1]["stream"] == "compute"
    assert "upload" in p.describe()


def test_random_dags_respect_every_edge():
    rng = random.Random(1234)
    for trial in range(20):
        n = rng.randint(5, 40)
        # Placeholders: a consumer may be listed before its producer and still runs after it.
        values = [Placeholder(f"v{i}") for i in range(n)]
        stages = []
        for i in range(n):
            deps = [f"s{j}" for j in range(i) if rng.random() < 0.15]
            reads = [values[j] for j in range(i) if rng.random() < 0.1]
            stages.append(stage(f"s{i}", inputs=reads, outputs=[values[i]], depends_on=deps,
                                priority=rng.randint(0, 3)))
        shuffled = stages[:]
        rng.shuffle(shuffled)
        for listed in (stages, shuffled):
            order = TaskGraph(listed).validate().order
            pos = {name: k for k, name in enumerate(order)}
            assert sorted(pos) == sorted(s.name for s in stages)
            for s in listed:
                for d in s.depends_on:
                    assert pos[d] < pos[s.name]
                for v in s.inputs:
                    assert pos[f"s{values.index(v)}"] < pos[s.name]


def test_provided_tensor_read_before_its_writer_is_listed_keeps_program_order():
    t = FakeTensor(0x7000, 64)
    # Listed first, the reader sees what the caller put in t; the writer must wait for it.
    assert order_of([stage("read", inputs=[t]), stage("write", outputs=[t], priority=9)]) == ["read", "write"]
    g = TaskGraph([stage("read", inputs=[t], depends_on=["write"]), stage("write", outputs=[t])])
    with pytest.raises(ValueError, match="cycle.*overwrites.*list the writer before"):
        g.validate()


def test_adding_a_stage_invalidates_the_cached_structure():
    g = TaskGraph([stage("a")])
    assert g.validate().order == ["a"]
    g.stage("b", depends_on=["a"], priority=9)
    assert g.validate().order == ["a", "b"]
