"""Stage contracts: what one unit of submitted work reads, writes, costs and runs.

A :class:`StageContract` is plain data. It names its inputs and outputs (tensors, or
:class:`Placeholder` values that only exist inside a graph), its token budget and the
device working set it needs, and what it runs:

- a :class:`~nexusrt.kernels.ops.spec.LaunchSpec` (a CUDA kernel launch, fully described),
- a ``Kernel`` plus ``grid``/``block``/``args`` (packed once here into a LaunchSpec),
- a Python callable (a NumPy kernel on the CPU backend, or host code on either backend
  that may enqueue work itself; it is called as ``fn(*args)``, plus ``stream=`` when its
  signature has a ``stream`` parameter),
- nothing (``kernel=None``): a marker that orders its stream and can be waited on.

Nothing in this module touches the driver, so contracts are built and checked on any machine.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..driver.streams import ROLES

MIB = 1 << 20
MAX_CHUNKS = 1 << 20  # submissions one split may make


class Placeholder:
    """A value declared by name that no allocation backs: a stage must produce it.

    Use one for an intermediate that only has meaning inside a graph (or as a pure
    ordering token). A stage that reads a placeholder no stage writes is an error at
    validation; a real tensor (anything else) counts as provided by the caller.
    """

    def __init__(self, name: str, shape: tuple | None = None, dtype: str | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a placeholder needs a non-empty name, got {name!r}")
        self.name, self.shape, self.dtype = name, shape, dtype

    def __repr__(self) -> str:
        return f"Placeholder({self.name!r})"


@dataclass(eq=False)
class StageContract:
    """One stage of work; build it with :func:`nexusrt.scheduler.stage`.

    ``kind`` is ``"launch"`` (``kernel`` is a LaunchSpec), ``"host"`` (a callable) or
    ``"marker"``. ``gate`` is ``(doorbell, value or None)``: the stage's stream waits until
    the doorbell reaches the value (None: the next ring after submission). ``ring`` is a
    doorbell the stage's stream rings once the stage is done.
    """

    name: str
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    token_budget: int | None = None
    sm_footprint_mb: float = 0
    kernel: Any = None
    args: tuple = ()
    depends_on: tuple = ()
    stream: Any = "compute"
    priority: int = 0
    gate: tuple | None = None
    ring: Any = None
    kind: str = "marker"
    wants_stream: bool = False

    def __post_init__(self):
        check_contract(self)

    @property
    def footprint_bytes(self) -> int:
        return int(round(float(self.sm_footprint_mb) * MIB))

    @property
    def stream_role(self) -> str:
        """The stream's role name (a Stream object given directly reports its role)."""
        return self.stream if isinstance(self.stream, str) else getattr(self.stream, "role", "?")

    def split(self, n_tokens: int) -> list[tuple[int, int]]:
        """Split ``n_tokens`` into ``(start, count)`` chunks of at most ``token_budget``.

        The engine uses this for chunked prefill: one submission per chunk. More than
        :data:`MAX_CHUNKS` chunks is a ValueError (the list would not fit in memory long before).
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral):
            raise TypeError(f"stage {self.name!r}: split takes an integer token count, got {n_tokens!r}")
        n_tokens = int(n_tokens)
        if n_tokens < 0:
            raise ValueError(f"stage {self.name!r}: cannot split {n_tokens} tokens")
        if self.token_budget is None or n_tokens <= self.token_budget:
            return [(0, n_tokens)] if n_tokens else []
        if self.token_budget == 0:
            raise ValueError(f"stage {self.name!r} has token_budget=0 and cannot take {n_tokens} tokens")
        step = self.token_budget
        if -(-n_tokens // step) > MAX_CHUNKS:
            raise ValueError(f"stage {self.name!r}: {n_tokens} tokens in chunks of {step} would be "
                             f"{-(-n_tokens // step)} submissions, more than {MAX_CHUNKS}")
        return [(s, min(step, n_tokens - s)) for s in range(0, n_tokens, step)]

    def __repr__(self) -> str:
        return f"StageContract({self.name!r}, {self.kind}, stream={self.stream_role!r})"


def check_contract(s: StageContract) -> None:
    """The checks one stage can make alone; raise ValueError naming the stage and the reason."""
    if not isinstance(s.name, str) or not s.name:
        raise ValueError(f"a stage needs a non-empty string name, got {s.name!r}")
    if s.token_budget is not None:
        if isinstance(s.token_budget, bool) or not isinstance(s.token_budget, int):
            raise ValueError(f"stage {s.name!r}: token_budget must be an int or None, got {s.token_budget!r}")
        if s.token_budget < 0:
            raise ValueError(f"stage {s.name!r}: token_budget must be non-negative, got {s.token_budget}")
    mb = s.sm_footprint_mb
    if isinstance(mb, bool) or not isinstance(mb, numbers.Real):
        raise ValueError(f"stage {s.name!r}: sm_footprint_mb must be a number, got {mb!r}")
    if not 0 <= mb < math.inf:  # also rejects NaN
        raise ValueError(f"stage {s.name!r}: sm_footprint_mb must be a finite number >= 0, got {mb}")
    role = s.stream if isinstance(s.stream, str) else getattr(s.stream, "role", None)
    if role not in ROLES:
        raise ValueError(f"stage {s.name!r}: unknown stream {s.stream!r}; streams are {', '.join(ROLES)} "
                         "(or a Stream of the runtime's pool)")
    if isinstance(s.priority, bool) or not isinstance(s.priority, numbers.Integral):
        raise ValueError(f"stage {s.name!r}: priority must be an integer, got {s.priority!r}")
    for d in s.depends_on:
        if not isinstance(d, str):
            raise ValueError(f"stage {s.name!r}: depends_on entries must be stage names, got {d!r}")
    if s.gate is not None:
        if not (isinstance(s.gate, tuple) and len(s.gate) == 2):
            raise ValueError(f"stage {s.name!r}: gate must be a Doorbell or (Doorbell, value), got {s.gate!r}")
        bell, value = s.gate
        if not hasattr(bell, "wait_on"):
            raise ValueError(f"stage {s.name!r}: gate must be a Doorbell or (Doorbell, value), got {bell!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"stage {s.name!r}: a gate value must be an integer >= 0 (or None: the next ring), "
                             f"got {value!r}")
    if s.ring is not None and not hasattr(s.ring, "ring"):
        raise ValueError(f"stage {s.name!r}: ring must be a Doorbell, got {s.ring!r}")


def make_stage(name, inputs=(), outputs=(), token_budget=None, sm_footprint_mb=0, kernel=None,
               grid=None, block=None, shared_mem_bytes=0, args=(), depends_on=(),
               stream="compute", priority=None, gate=None, ring=None) -> StageContract:
    """Normalise the arguments of :func:`nexusrt.scheduler.stage` into a StageContract."""
    kind, wants_stream = "marker", False
    if kernel is None:
        if grid is not None or block is not None or args:
            raise ValueError(f"stage {name!r}: grid/block/args were given but no kernel")
    elif callable(kernel):
        kind = "host"
        wants_stream = _accepts_stream(kernel)
    elif hasattr(kernel, "grid") and hasattr(kernel, "launch"):  # a LaunchSpec
        if grid is not None or block is not None or args or shared_mem_bytes:
            raise ValueError(f"stage {name!r}: a LaunchSpec carries its own grid/block/args/shared memory; "
                             "do not pass them")
        kind = "launch"
    elif hasattr(kernel, "pack") and hasattr(kernel, "launch"):  # a Kernel: pack its args once
        if grid is None or block is None:
            raise ValueError(f"stage {name!r}: a Kernel needs grid= and block=")
        from ..kernels.ops.spec import LaunchSpec  # deferred: keeps this module driver-free

        pack = args if hasattr(args, "address") else kernel.pack(*args)
        kernel = LaunchSpec(kernel, dim3(grid), dim3(block), pack, int(shared_mem_bytes), name)
        args, kind = (), "launch"
    else:
        raise ValueError(f"stage {name!r}: kernel must be a LaunchSpec, a Kernel, a callable or None, "
                         f"got {type(kernel).__name__}")
    if isinstance(depends_on, (str, StageContract)):
        depends_on = (depends_on,)
    deps = tuple(d.name if isinstance(d, StageContract) else d for d in _sequence(name, "depends_on", depends_on))
    if gate is not None and not isinstance(gate, tuple):
        gate = (gate, None)
    if kind == "host":
        args = tuple(_sequence(name, "args", args))
    return StageContract(
        name=name, inputs=_sequence(name, "inputs", inputs), outputs=_sequence(name, "outputs", outputs),
        token_budget=token_budget, sm_footprint_mb=sm_footprint_mb, kernel=kernel,
        args=args if kind == "host" else (), depends_on=deps, stream=stream,
        priority=0 if priority is None else priority, gate=gate, ring=ring, kind=kind, wants_stream=wants_stream,
    )


def _sequence(stage: str, what: str, value) -> list:
    """``value`` (a list, tuple or other non-text iterable) as a list; TypeError naming it otherwise."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise TypeError(f"stage {stage!r}: {what} must be a list or tuple, got {type(value).__name__} {value!r:.60}")
    return list(value)


def _accepts_stream(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return "stream" in params


def dim3(d) -> tuple[int, int, int]:
    if isinstance(d, int):
        return d, 1, 1
    d = tuple(int(x) for x in d)
    if not 1 <= len(d) <= 3:
        raise ValueError(f"a grid or block has 1 to 3 dimensions, got {d}")
    return (d + (1, 1, 1))[:3]
