"""Task graphs of stages, validated into a submission plan (pure logic, no driver).

Validation happens before any work is submitted and raises ``ValueError`` naming the stage
and the reason: duplicate names, unknown dependencies, cycles (the message spells the
cycle out, with why each edge exists), inputs nobody provides, negative budgets, a working
set larger than the device can still give, a CUDA kernel on the CPU backend.

The plan is a topological order: among stages that are ready at once, higher ``priority``
goes first, then the order the stages were added.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from .contract import MIB, StageContract, check_contract, make_stage
from .hazards import tensor_edges


@dataclass
class PlanItem:
    """One stage in submission order, with what it waits for."""

    stage: StageContract
    index: int
    deps: list[int] = field(default_factory=list)  # plan indices of the stages it runs after
    external: list[str] = field(default_factory=list)  # names submitted earlier, outside this graph
    cross: list[int] = field(default_factory=list)  # deps on other streams (ordered with events)
    signals: bool = False  # a stage on another stream waits for this one

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def role(self) -> str:
        return self.stage.stream_role


@dataclass
class Plan:
    """A validated graph: the stages in the order they are submitted."""

    graph: str
    items: list[PlanItem]
    free_bytes: int | None = None
    free_source: str = ""

    @property
    def order(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(it.role for it in self.items))

    def rows(self) -> list[dict]:
        """The plan as data: per stage its stream, kind, dependencies, budget and footprint."""
        return [{
            "stage": it.name, "stream": it.role, "kind": it.stage.kind,
            "after": [self.items[d].name for d in it.deps] + it.external,
            "token_budget": it.stage.token_budget,
            "sm_footprint_mb": float(it.stage.sm_footprint_mb),
            "gated": it.stage.gate is not None,
        } for it in self.items]

    def describe(self) -> str:
        """A readable listing of the plan, with the footprint against what the device can give."""
        lines = [f"plan {self.graph!r}: {len(self.items)} stages on {', '.join(self.streams) or 'no streams'}"]
        for r in self.rows():
            after = f" after {', '.join(r['after'])}" if r["after"] else ""
            budget = "unlimited" if r["token_budget"] is None else r["token_budget"]
            lines.append(f"  {r['stage']} [{r['stream']}, {r['kind']}] tokens<={budget} "
                         f"footprint {r['sm_footprint_mb']:g} MiB{after}")
        if self.free_bytes is not None:
            peak = max((it.stage.footprint_bytes for it in self.items), default=0)
            lines.append(f"  largest footprint {peak / MIB:g} MiB of {self.free_bytes / MIB:,.0f} MiB "
                         f"free ({self.free_source})")
        return "\n".join(lines)


class TaskGraph:
    """Stages and the order between them. Add stages, then submit or capture the graph.

    Don't mutate a stage after adding it: the structure is cached until the next ``add``.
    """

    def __init__(self, stages=(), name: str = "graph"):
        self.name = name
        self.stages: list[StageContract] = []
        self._cache = None
        self.extend(stages)

    def add(self, stage: StageContract) -> StageContract:
        if not isinstance(stage, StageContract):
            raise TypeError(f"graph {self.name!r}: expected a StageContract, got {type(stage).__name__}")
        self.stages.append(stage)
        self._cache = None
        return stage

    def extend(self, stages) -> "TaskGraph":
        for s in stages:
            self.add(s)
        return self

    def stage(self, name: str, **kwargs) -> StageContract:
        """Build a stage (same arguments as :func:`nexusrt.scheduler.stage`) and add it."""
        return self.add(make_stage(name, **kwargs))

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def validate(self, backend: str | None = None, free_bytes: int | None = None,
                 free_source: str = "", known=()) -> Plan:
        """Check everything that can be checked before running; return the :class:`Plan`.

        ``known`` holds names of stages submitted earlier, which ``depends_on`` may name.
        """
        for s in self.stages:
            check_contract(s)
            if backend == "cpu" and s.kind == "launch":
                raise ValueError(f"stage {s.name!r} launches a CUDA kernel but the runtime runs the CPU "
                                 "backend; give the stage a NumPy callable instead")
            if free_bytes is not None and s.footprint_bytes > free_bytes:
                raise ValueError(
                    f"stage {s.name!r}: sm_footprint_mb={float(s.sm_footprint_mb):g} MiB "
                    f"({s.footprint_bytes} bytes) is more than the {free_bytes} bytes "
                    f"({free_bytes / MIB:,.1f} MiB) the device can still give ({free_source or 'device'})")
        order, preds, externals = self._structure(known)  # a dict or set: no copy per submission
        pos = {idx: p for p, idx in enumerate(order)}
        items = []
        for p, idx in enumerate(order):
            s = self.stages[idx]
            deps = sorted(pos[d] for d in preds[idx])
            items.append(PlanItem(s, p, deps, externals[idx],
                                  [d for d in deps if items[d].role != s.stream_role]))
        for it in items:
            for d in it.cross:
                items[d].signals = True
        return Plan(self.name, items, free_bytes, free_source)

    # -- structure ---------------------------------------------------------------------------
    def _structure(self, known):
        """(topological order, predecessors per stage, external deps per stage); cached."""
        names = Counter(s.name for s in self.stages)
        dup = [n for n, k in names.items() if k > 1]
        if dup:
            raise ValueError(f"stage {dup[0]!r} appears {names[dup[0]]} times in graph {self.name!r}; "
                             "stage names must be unique")
        index = {s.name: i for i, s in enumerate(self.stages)}
        externals = [[] for _ in self.stages]
        for i, s in enumerate(self.stages):
            for d in s.depends_on:
                if d not in index:
                    if d not in known:
                        raise ValueError(f"stage {s.name!r} depends on {d!r}, which is not in graph "
                                         f"{self.name!r} and was never submitted (or finished long ago "
                                         "and was forgotten)")
                    externals[i].append(d)
        if self._cache is None:
            self._cache = self._order(index)
        order, preds = self._cache
        return order, preds, externals

    def _order(self, index: dict[str, int]):
        n = len(self.stages)
        reason: dict[tuple[int, int], str] = {}
        for i, s in enumerate(self.stages):
            for d in s.depends_on:
                if d in index:
                    reason.setdefault((index[d], i), "depends_on")
        for u, v, why in tensor_edges(self.stages):
            reason.setdefault((u, v), why)
        preds = [set() for _ in range(n)]
        succs = [[] for _ in range(n)]
        for u, v in reason:
            preds[v].add(u)
            succs[u].append(v)
        indeg = [len(p) for p in preds]
        ready = [(-self.stages[i].priority, i) for i in range(n) if indeg[i] == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, u = heapq.heappop(ready)
            order.append(u)
            for v in succs[u]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    heapq.heappush(ready, (-self.stages[v].priority, v))
        if len(order) < n:
            raise ValueError(self._cycle_message(preds, indeg, reason))
        return order, preds

    def _cycle_message(self, preds, indeg, reason) -> str:
        # Every stage left with in-degree > 0 has a predecessor that is also left, so walking
        # predecessors must revisit a stage: that loop is a cycle.
        left = {i for i, k in enumerate(indeg) if k > 0}
        seen: dict[int, int] = {}
        node, path = min(left), []
        while node not in seen:
            seen[node] = len(path)
            path.append(node)
            node = min(p for p in preds[node] if p in left)
        loop = path[seen[node]:][::-1]  # walked backwards; turn into run order
        k = loop.index(min(loop))  # start at the earliest-added stage, so the message is stable
        loop = loop[k:] + loop[:k + 1]
        names = " -> ".join(repr(self.stages[i].name) for i in loop)
        whys = "; ".join(f"{self.stages[v].name!r} {reason[(u, v)]} {self.stages[u].name!r}"
                         for u, v in zip(loop, loop[1:]))
        hint = ""
        if "overwrites" in whys:
            hint = (" Stages that touch the same tensor keep the order they were added in: "
                    "list the writer before its readers, or use a placeholder.")
        return f"stage {self.stages[loop[0]].name!r} is in a cycle in graph {self.name!r}: {names} ({whys}).{hint}"
