"""Dependencies that tensors imply between stages (pure logic, no driver).

Stages run in *program order* (the order they were added to the graph) unless the tensors
they touch say otherwise. Two tensors are the same resource when their byte ranges on the
same device overlap (so a view and its base are ordered); objects without an address
(placeholders, plain Python objects) are compared by identity.

Per resource, walking stages in program order:

- a reader runs after the last writer before it (read after write);
- a writer runs after the last writer before it (write after write) and after every
  reader since that write (write after read), so an in-place update of a residual
  stream read by earlier stages never overtakes them;
- a reader of an *unprovided* value (a :class:`Placeholder`) with no writer before it runs
  after its first writer later in the list, so a graph may list a consumer before its
  producer; with no writer anywhere the graph is invalid.
- a reader of a *provided* tensor (allocated by the caller) with no writer before it
  reads what the caller put there.
"""

from __future__ import annotations

from .contract import Placeholder


def extent(obj):
    """``(device, start, end)`` for address-backed objects (tensors, arrays), else None."""
    if isinstance(obj, Placeholder) or not is_provided(obj):
        return None
    try:  # a tensor's .ptr raises once its memory is freed
        ptr = getattr(obj, "ptr", None)
        if ptr is None and hasattr(obj, "__array_interface__"):
            ptr = obj.__array_interface__["data"][0]
        ptr, nbytes = int(ptr), int(getattr(obj, "nbytes", None))
    except Exception:
        return None
    if ptr <= 0 or nbytes <= 0:
        return None
    return str(getattr(obj, "device", "")), ptr, ptr + nbytes


def is_provided(obj) -> bool:
    """Whether a value exists before the graph runs: anything but a placeholder or a freed tensor."""
    if isinstance(obj, Placeholder):
        return False
    return getattr(obj, "is_live", True) is not False and not getattr(obj, "freed", False)


def describe(obj) -> str:
    if isinstance(obj, Placeholder):
        return f"placeholder {obj.name!r}"
    shape = getattr(obj, "shape", None)
    dtype = getattr(obj, "dtype", None)
    if shape is not None:
        freed = "" if is_provided(obj) else "freed "
        return f"{freed}tensor shape={tuple(shape)} dtype={dtype}"
    return f"{type(obj).__name__} object"


def resource_ids(stages) -> tuple[list[list[int]], list[list[int]], dict[int, object]]:
    """Map every input/output to a resource id; returns (reads, writes, an example object per id).

    Overlapping byte ranges on one device merge into one resource (sorted sweep, so the
    cost is n log n in the number of tensors, not quadratic).
    """
    ranged, by_identity = [], {}
    for s in stages:
        for obj in (*s.inputs, *s.outputs):
            ext = extent(obj)
            if ext is None:
                by_identity.setdefault(id(obj), obj)
            else:
                ranged.append((ext, obj))
    range_id: dict[tuple, int] = {}
    example: dict[int, object] = {}
    next_id = 0
    current_dev, current_end = None, -1
    for (dev, start, end), obj in sorted(ranged, key=lambda t: t[0]):
        if dev != current_dev or start >= current_end:
            next_id += 1
            current_dev, current_end = dev, end
            example[next_id] = obj
        else:
            current_end = max(current_end, end)
        range_id[(dev, start, end)] = next_id
    ident_id = {}
    for key, obj in by_identity.items():
        next_id += 1
        ident_id[key] = next_id
        example[next_id] = obj

    def rid(obj) -> int:
        ext = extent(obj)
        return ident_id[id(obj)] if ext is None else range_id[ext]

    reads = [list(dict.fromkeys(rid(o) for o in s.inputs)) for s in stages]
    writes = [list(dict.fromkeys(rid(o) for o in s.outputs)) for s in stages]
    return reads, writes, example


def tensor_edges(stages) -> list[tuple[int, int, str]]:
    """Edges ``(before, after, reason)`` between stage indices implied by their tensors.

    Raises ValueError naming the stage when it reads a value that nothing provides or produces.
    """
    reads, writes, example = resource_ids(stages)
    provided = {r: is_provided(o) for r, o in example.items()}
    first_writer: dict[int, int] = {}
    for i, ws in enumerate(writes):
        for r in ws:
            first_writer.setdefault(r, i)
    edges = []
    last_writer: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(stages):
        for r in reads[i]:
            what = describe(example[r])
            if r in last_writer:
                edges.append((last_writer[r], i, f"reads {what} written by"))
                readers.setdefault(r, []).append(i)
            elif provided[r]:
                readers.setdefault(r, []).append(i)
            else:
                w = first_writer.get(r)
                if w is None or w == i:
                    raise ValueError(f"stage {s.name!r} reads {what}, which no stage produces and the "
                                     "caller does not provide (allocate a tensor or add a stage that writes it)")
                edges.append((w, i, f"reads {what} produced by"))
        for r in writes[i]:
            what = describe(example[r])
            w = last_writer.get(r)
            if w is not None and w != i:
                edges.append((w, i, f"overwrites {what} written by"))
            for j in readers.get(r, ()):
                if j != i:
                    edges.append((j, i, f"overwrites {what} read by"))
            last_writer[r] = i
            readers[r] = []
    return edges
