"""Lower the decode step's stage chain into per-SM instruction lists for the persistent kernel.

The input is the list :func:`nexusrt.backends.cuda.step.decode_stages` returns: the same task
graph the CUDA-graph path captures, read in the scheduler's plan order. Each stage is
recognised by its name and cut into tiles whose shapes come from the model config; the
dependencies between tiles are counters at the granularity of the data a tile reads:

- a QKV tile never straddles two heads (``tile_rows`` divides ``head_dim``), so each tile
  belongs to one KV head group (its q heads, or its k or v head) and signals that group's
  counter; RoPE/append of KV head h waits only for group h's tiles;
- attention of KV head h waits only for RoPE/append of head h (which wrote its q heads and
  the new K/V slot); split attention parts signal a per-head counter the combine waits on;
- O, gate/up, down and the LM head need their whole input vector (or its RMSNorm), so they
  wait for the full producer stage;
- a sampler partial waits only for the LM-head tiles of its chunk of the vocabulary; a gather
  (one per chunk) for every partial; the finish for every partial and every gather. The
  sampler's three stages (the graph path's three launches) lower one to one, their work chosen
  on the device by the parameters the host writes per request: greedy, argmax partials per chunk and their combine (the gathers skip
  their waits and only signal, so greedy keeps one grid-wide hop); temperature > 0, the
  grid-wide exact top-K of ``cu/sampling_grid.cuh`` (:mod:`.topk` is its model): partials add
  their chunk's key histogram, gathers compact their chunk's candidates into a pool, the finish
  draws from the pool (exact top-K, top-p, the seeded uniform of the step).

Write-after-read hazards need no counters of their own: every buffer is rewritten only by a
stage that transitively waited for all readers of its previous contents (e.g. the next
layer's QKV tiles wait for every down tile, which waited for everything of this layer).

**Why it cannot deadlock.** Instructions are emitted in one global order in which every wait
names a counter signalled only by instructions earlier in that order, and each SM's list is a
subsequence of it. Take the earliest instruction, in the global order, that has not run: its
waits are on earlier instructions, all done; every instruction before it on its SM is earlier
too, so done; so it is at the head of its SM's list and can run. Some SM can therefore always
advance, provided every CTA is resident at once (one CTA per SM, so a spinning CTA never
occupies the slot the runnable one needs) and signals become visible (release/acquire).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ....scheduler import stage as _marker_stage
from ....scheduler.graph import TaskGraph
from .balance import balance, instruction_bytes, place
from .instructions import Instruction, Op, pack

LAYER_OPS = ("qkv", "rope_append", "attention", "o", "gate_up", "down")
_LAYER_RE = re.compile(r"^decode\.layer(\d+)\.([a-z_]+)$")
_TOP = {"decode.embed": "embed", "decode.lm_head": "lm_head", "sample.partial": "sample_partial",
        "sample.gather": "sample_gather", "sample.finish": "sample_finish"}


@dataclass(frozen=True)
class Counter:
    """A counter in global memory: it reaches ``target`` when the data it guards is complete."""

    name: str
    target: int


@dataclass
class Program:
    """A lowered decode step: ``instructions`` in the global topological order, each SM's list
    as indices into it (``lists``), the counters, each instruction's bytes, the phases."""

    config: object
    num_sms: int
    tile_rows: int
    attn_splits: int
    instructions: list[Instruction]
    lists: list[list[int]]
    counters: list[Counter]
    costs: list[int]
    phases: list[tuple[str, list[int]]] = field(repr=False, default_factory=list)

    def sm_instructions(self) -> list[list[Instruction]]:
        """Each SM's instructions, in the order it runs them."""
        return [[self.instructions[i] for i in li] for li in self.lists]

    def pack(self):
        """``(table, offsets)``: the int32 rows the kernel reads (see :func:`instructions.pack`)."""
        return pack(self.sm_instructions())

    def balance(self) -> dict:
        """Per-SM byte balance of the placement (see :func:`balance.balance`)."""
        sm_of = [0] * len(self.instructions)
        for s, li in enumerate(self.lists):
            for i in li:
                sm_of[i] = s
        return balance(self.phases, self.costs, sm_of, self.num_sms)


class _Builder:
    def __init__(self, cfg, tile_rows: int, splits: int, chunk_tiles: int):
        self.cfg, self.tile, self.splits, self.chunk_tiles = cfg, tile_rows, splits, chunk_tiles
        self.ins: list[Instruction] = []
        self.counters: list[Counter] = []
        self.phases: list[tuple[str, list[int]]] = []
        self.ready: dict = {}  # what a later stage waits for: name -> (counter, target) or list

    def counter(self, name: str, target: int) -> int:
        self.counters.append(Counter(name, target))
        return len(self.counters) - 1

    def emit(self, *instructions: Instruction) -> None:
        self.phases[-1][1].extend(range(len(self.ins), len(self.ins) + len(instructions)))
        self.ins.extend(instructions)

    def tiles(self, lo: int, hi: int):
        return [(a, min(a + self.tile, hi)) for a in range(lo, hi, self.tile)]

    def gemv(self, op: Op, layer: int, n: int, name: str, wait) -> tuple[int, int]:
        """Tiles of a GEMV over ``n`` output rows that all wait for ``wait``; one counter."""
        tiles = self.tiles(0, n)
        c = self.counter(name, len(tiles))
        self.emit(*(Instruction(op, layer, a, b, 0, c, (wait,)) for a, b in tiles))
        return c, len(tiles)


def _lower_stage(bl: _Builder, kind: str, layer: int, sample: bool) -> None:
    cfg = bl.cfg
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    g = hq // hkv
    if kind == "embed":
        c = bl.counter("embed", 1)
        bl.emit(Instruction(Op.EMBED, 0, 0, h, 0, c))
        bl.ready["x"] = (c, 1)
    elif kind == "qkv":  # group-major: group 0's tiles first, so its RoPE can start early
        groups = []
        for kv in range(hkv):
            rows = [(kv * g * d, (kv + 1) * g * d), (hq * d + kv * d, hq * d + (kv + 1) * d),
                    ((hq + hkv) * d + kv * d, (hq + hkv) * d + (kv + 1) * d)]
            tiles = [t for lo, hi in rows for t in bl.tiles(lo, hi)]
            c = bl.counter(f"layer{layer}.qkv.group{kv}", len(tiles))
            bl.emit(*(Instruction(Op.QKV, layer, a, b, 0, c, (bl.ready["x"],)) for a, b in tiles))
            groups.append((c, len(tiles)))
        bl.ready["qkv"] = groups
    elif kind == "rope_append":
        heads = []
        for kv, wait in enumerate(bl.ready["qkv"]):
            c = bl.counter(f"layer{layer}.rope.head{kv}", 1)
            bl.emit(Instruction(Op.ROPE_APPEND, layer, kv, kv + 1, 0, c, (wait,)))
            heads.append((c, 1))
        bl.ready["rope"] = heads
    elif kind == "attention":
        done = bl.counter(f"layer{layer}.attention", hkv)
        if bl.splits == 1:
            bl.emit(*(Instruction(Op.ATTENTION, layer, kv, kv + 1, 0, done, (w,))
                      for kv, w in enumerate(bl.ready["rope"])))
        else:
            parts = [bl.counter(f"layer{layer}.attention.head{kv}.parts", bl.splits) for kv in range(hkv)]
            bl.emit(*(Instruction(Op.ATTENTION, layer, kv, kv + 1, p, parts[kv], (w,))
                      for kv, w in enumerate(bl.ready["rope"]) for p in range(bl.splits)))
            bl.phases.append(("attn_combine", []))
            bl.emit(*(Instruction(Op.ATTN_COMBINE, layer, kv, kv + 1, bl.splits, done, ((parts[kv], bl.splits),))
                      for kv in range(hkv)))
        bl.ready["attn"] = (done, hkv)
    elif kind == "o":
        bl.ready["x"] = bl.gemv(Op.O_PROJ, layer, h, f"layer{layer}.o", bl.ready["attn"])
    elif kind == "gate_up":
        bl.ready["mlp"] = bl.gemv(Op.GATE_UP, layer, cfg.intermediate_size, f"layer{layer}.gate_up", bl.ready["x"])
    elif kind == "down":
        bl.ready["x"] = bl.gemv(Op.DOWN, layer, h, f"layer{layer}.down", bl.ready["mlp"])
    elif kind == "lm_head":
        tiles = bl.tiles(0, cfg.vocab_size)
        chunks = [tiles[i:i + bl.chunk_tiles] for i in range(0, len(tiles), bl.chunk_tiles)] if sample else [tiles]
        bl.ready["chunks"] = []
        for ci, chunk in enumerate(chunks):
            c = bl.counter(f"lm_head.chunk{ci}", len(chunk))
            bl.emit(*(Instruction(Op.LM_HEAD, 0, a, b, 0, c, (bl.ready["x"],)) for a, b in chunk))
            bl.ready["chunks"].append((chunk[0][0], chunk[-1][1], (c, len(chunk))))
    elif kind == "sample_partial":
        chunks = bl.ready["chunks"]
        c = bl.counter("sample.partials", len(chunks))
        bl.emit(*(Instruction(Op.SAMPLE_PARTIAL, 0, a, b, ci, c, (w,)) for ci, (a, b, w) in enumerate(chunks)))
        bl.ready["partials"] = (c, len(chunks))
    elif kind == "sample_gather":
        chunks, partials = bl.ready["chunks"], bl.ready["partials"]
        g = bl.counter("sample.gathered", len(chunks))
        bl.emit(*(Instruction(Op.SAMPLE_GATHER, 0, a, b, ci, g, (partials,)) for ci, (a, b, _) in enumerate(chunks)))
        bl.ready["gathered"] = (g, len(chunks))
    elif kind == "sample_finish":
        # Both waits: a greedy step's gathers do not wait for the partials, so the finish does.
        c = bl.counter("step.done", 1)
        bl.emit(Instruction(Op.SAMPLE_FINISH, 0, 0, 1, bl.ready["partials"][1], c,
                            (bl.ready["partials"], bl.ready["gathered"])))


def _parse(name: str) -> tuple[str, int]:
    """``(kind, layer)`` of a stage name, or ValueError naming what the lowering knows."""
    if name in _TOP:
        return _TOP[name], 0
    m = _LAYER_RE.match(name)
    if m and m.group(2) in LAYER_OPS:
        return m.group(2), int(m.group(1))
    raise ValueError(f"stage {name!r} is not one the persistent-kernel lowering knows; it lowers "
                     f"{', '.join(_TOP)} and decode.layer<i>.{{{','.join(LAYER_OPS)}}}")


def expected_chain(cfg, sample: bool = True) -> list[str]:
    """The stage names, in order, of the decode chain this lowering understands."""
    names = ["decode.embed"] + [f"decode.layer{i}.{op}" for i in range(cfg.num_hidden_layers) for op in LAYER_OPS]
    return names + ["decode.lm_head"] + (["sample.partial", "sample.gather", "sample.finish"] if sample else [])


def skeleton(cfg, sample: bool = True) -> list:
    """Marker stages with the decode chain's names and order: plan a shape with no weights or
    buffers (``tests/test_megakernel_plan.py`` checks it lowers exactly as decode_stages does)."""
    out = []
    for name in expected_chain(cfg, sample):
        out.append(_marker_stage(name=name, depends_on=(out[-1].name,) if out else ()))
    return out


def lower(stages, config, num_sms: int, tile_rows: int = 16, *, attn_splits: int = 1, context: int = 4096,
          weight_bytes: int = 2, kv_bytes: int = 2) -> Program:
    """The persistent-kernel :class:`Program` of a decode chain ``stages`` for ``config`` on
    ``num_sms`` SMs: GEMV tiles of ``tile_rows`` output rows, attention cut into ``attn_splits``
    parts along the KV length, placed by bytes (attention costed at ``context`` keys).

    Raises ValueError for a stage it does not know, a chain in another order or of another
    depth than ``config``, or a shape it cannot tile."""
    for what, v in (("num_sms", num_sms), ("tile_rows", tile_rows), ("attn_splits", attn_splits),
                    ("context", context)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if config.head_dim % tile_rows:
        raise ValueError(f"cannot tile: tile_rows {tile_rows} does not divide head_dim {config.head_dim}, so a QKV "
                         "tile would straddle two heads and RoPE could not wait for its own head's tiles alone")
    order = TaskGraph(stages, "decode").validate().order  # the scheduler's plan order (checks the graph)
    parsed = [_parse(n) for n in order]
    sample = any(k == "sample_partial" for k, _ in parsed)
    want = expected_chain(config, sample)
    if order != want:
        i = next((i for i, (a, b) in enumerate(zip(order, want)) if a != b), min(len(order), len(want)))
        got = order[i] if i < len(order) else "the end of the chain"
        raise ValueError(f"the decode chain does not match {config.num_hidden_layers} layers of "
                         f"{config.architecture}: stage {i} is {got!r}, expected "
                         f"{want[i] if i < len(want) else 'the end of the chain'!r}")
    n_lm = -(-config.vocab_size // tile_rows)
    bl = _Builder(config, tile_rows, attn_splits, chunk_tiles=-(-n_lm // num_sms))
    for kind, layer in parsed:
        bl.phases.append((kind, []))
        _lower_stage(bl, kind, layer, sample)
    costs = [instruction_bytes(i, config, weight_bytes=weight_bytes, kv_bytes=kv_bytes, context=context,
                               splits=attn_splits) for i in bl.ins]
    sm_of = place(bl.phases, costs, num_sms)
    lists = [[] for _ in range(num_sms)]
    for i, s in enumerate(sm_of):  # ascending global index: each list keeps the global order
        lists[s].append(i)
    prog = Program(config, num_sms, tile_rows, attn_splits, bl.ins, lists, bl.counters, costs, bl.phases)
    check(prog)
    return prog


def check(prog: Program) -> None:
    """Raise ValueError unless every counter is signalled exactly ``target`` times, every wait
    names a counter whose signals all come earlier in the global order, and each SM's list is a
    subsequence of that order (the two conditions of the deadlock argument)."""
    signals = [0] * len(prog.counters)
    for i, ins in enumerate(prog.instructions):
        for c, t in ins.waits:
            if signals[c] < t:
                raise ValueError(f"instruction {i} ({ins.op.name} layer {ins.layer}) waits for "
                                 f"{prog.counters[c].name} >= {t}, but only {signals[c]} signals precede it")
        if ins.signal >= 0:
            signals[ins.signal] += 1
    for c, n in zip(prog.counters, signals):
        if n != c.target:
            raise ValueError(f"counter {c.name} is signalled {n} times; its target is {c.target}")
    seen = sorted(i for li in prog.lists for i in li)
    if seen != list(range(len(prog.instructions))):
        raise ValueError("the SM lists do not hold every instruction exactly once")
    for s, li in enumerate(prog.lists):
        if any(a > b for a, b in zip(li, li[1:])):
            raise ValueError(f"SM {s}'s list leaves the global order, so the persistent kernel could deadlock")
