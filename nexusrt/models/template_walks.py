"""What a chat template's comparisons, hashes and sorts would walk, bounded before they run.

Python compares two lists, hashes a tuple and sorts a list by following every reference the
value holds, in C code that neither :mod:`nexusrt.models.template`'s trace function nor Ctrl-C
interrupts. A template can build a value that is small as objects but huge as references:
``{% set ns.x = [ns.x, ns.x] %}`` sixty times is sixty lists and 2**60 items to compare, and
``ns.x == other``, ``{ns.t: 1}``, ``[a, b]|sort``, ``x is eq(y)`` or ``{}.get(ns.t)`` would then run
for ever; so would ``[s] * 100000 == [t] * 100000`` with two equal 4 M-character strings (each pair
compared character by character). So every value about to be compared, hashed or sorted is counted
first the way those operations walk it (:func:`walk_size`: each item once per reference, a string
as its characters, each container's count worked out once), no further than just past the limit on
one value (``Limits.max_chars``), and a larger one is refused with
:class:`~nexusrt.models.template_sizes.TemplateLimitError`.

The places: the operands of every comparison (``==`` ... ``in``, ``not in``) and the keys of dict
literals (the compiled template calls :meth:`walked` there, through :class:`WalkCheckingCodeGenerator`),
every test that compares (:func:`walk_checked_test`), the filters that sort, hash or order their value
(:data:`WALKING_FILTERS`) and the calls that compare or hash their arguments: the methods of a list,
tuple or dict (``.index``, ``.count``, ``.get``), ``loop.changed`` and ``dict(...)``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, MappingView

from .template_sizes import current_limits, TemplateLimitError

CONTAINERS = (list, tuple, dict, set, frozenset, MappingView)  # what a comparison or hash walks into
# A comparison with a string literal this short or a number is left unchecked: `"user" in l` compares
# the literal with each of at most the limit's items, a few characters each.
SHORT_LITERAL = 64
WALKING_FILTERS = frozenset(["dictsort", "groupby", "max", "min", "sort", "unique"])
# jinja's tests that compare nothing (type checks, numbers, identity): left unwrapped, as they run
# on every message of most templates; every other test (eq, lt, in, ... and any added) is checked.
NON_WALKING_TESTS = frozenset(["boolean", "callable", "defined", "divisibleby", "escaped", "even", "false", "filter",
                               "float", "integer", "iterable", "lower", "mapping", "none", "number", "odd", "sameas",
                               "sequence", "string", "test", "true", "undefined", "upper"])


def walk_size(value, budget: int, seen: dict) -> int:
    """Items a comparison or hash of ``value`` may visit: a string its length (two equal-length
    strings compare character by character), another leaf 1, a container 1 + its items', an object
    referenced twice counted twice. Stops as soon as it is past ``budget``; ``seen`` (id -> (value,
    count)) holds each finished container's count so it is worked out once."""
    if not isinstance(value, CONTAINERS):
        return max(1, len(value)) if isinstance(value, (str, bytes)) else 1
    hit = seen.get(id(value))
    if hit is not None:
        return hit[1]
    items = itertools.chain.from_iterable(value.items()) if isinstance(value, Mapping) else value
    n = 1
    for item in items:
        if isinstance(item, CONTAINERS):
            n += walk_size(item, budget - n, seen)
        else:  # leaves inline: a call per item would cost a trace event each
            n += max(1, len(item)) if isinstance(item, (str, bytes)) else 1
        if n > budget:
            return n  # partial: not kept in seen
    seen[id(value)] = (value, n)  # the value kept alive, so that its id is not reused meanwhile
    return n


def check_walk(values, what: str) -> None:
    """Refuse ``what`` if the values it compares, hashes or sorts walk more than the limit together."""
    limit, total, seen = current_limits.get().max_chars, 0, {}
    try:
        for v in values:
            if isinstance(v, CONTAINERS):
                total += walk_size(v, limit - total, seen)
                if total > limit:
                    raise TemplateLimitError(
                        f"{what} would walk more than {limit} items (the characters of its strings, and a value "
                        "it refers to twice counted twice: comparing, hashing or sorting follows every reference)")
    except RecursionError:
        raise TemplateLimitError(f"{what} was given a value nested too deeply to compare") from None


def walk_checked_test(name: str, fn):
    """``fn`` itself for a test in :data:`NON_WALKING_TESTS`, else one whose value and arguments
    are walk-checked first (``eq``, ``in``, ``lt``...)."""
    if name in NON_WALKING_TESTS:
        return fn

    @functools.wraps(fn)  # keeps jinja's pass_* markers
    def wrapper(*args, **kwargs):
        check_walk((*args, *kwargs.values()), f"test {name!r}")
        return fn(*args, **kwargs)
    return wrapper


def walk_checked_filter(name: str, fn):
    """``fn`` itself, or for a filter that sorts, hashes or orders (:data:`WALKING_FILTERS`) one
    whose value and arguments are walk-checked first."""
    if name not in WALKING_FILTERS:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        check_walk((*args, *kwargs.values()), f"filter {name!r}")
        return fn(*args, **kwargs)
    return wrapper


def code_generator_class():
    """jinja's code generator, with every comparison operand and dict-literal key passed through
    ``environment.walked`` (the sandbox's :meth:`walked`) before Python compares or hashes it."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, operators, optimizeconst

    def literal(node) -> bool:  # written out in the source: its walk is as long as its text
        return isinstance(node, nodes.Const) or (isinstance(node, (nodes.List, nodes.Tuple))
                                                 and all(literal(item) for item in node.items))

    def scalar(node) -> bool:  # a number or short string literal: comparing with it walks next to nothing
        return isinstance(node, nodes.Const) and (isinstance(node.value, (int, float, type(None))) or (
            isinstance(node.value, str) and len(node.value) <= SHORT_LITERAL))

    class WalkCheckingCodeGenerator(CodeGenerator):
        def walked(self, node, frame, what: str) -> None:
            if literal(node):  # `role == "user"`, `x in ["a", "b"]`: nothing to check, no call at run time
                self.visit(node, frame)
                return
            self.write("environment.walked(")
            self.visit(node, frame)
            self.write(f", {what!r})")

        @optimizeconst  # as jinja's own: a comparison of constants is folded when compiled
        def visit_Compare(self, node, frame):
            if len(node.ops) == 1 and (scalar(node.expr) or scalar(node.ops[0].expr)):
                # `role == "user"`, `"x" in message`: a container against a string or number is unequal,
                # unordered, or (for `in`) searched one top-level item at a time: no walk to check.
                # (A long literal is walked: `in` compares it with every item, equal lengths in full.)
                super().visit_Compare(node, frame)
                return
            self.write("(")
            self.walked(node.expr, frame, "a comparison")
            for op in node.ops:
                self.visit(op, frame)
            self.write(")")

        def visit_Operand(self, node, frame):
            self.write(f" {operators[node.op]} ")
            self.walked(node.expr, frame, "a comparison")

        def visit_Dict(self, node, frame):
            self.write("{")
            for idx, item in enumerate(node.items):
                if idx:
                    self.write(", ")
                self.walked(item.key, frame, "a dict key")
                self.write(": ")
                self.visit(item.value, frame)
            self.write("}")

    return WalkCheckingCodeGenerator


def walked(value, what: str):
    """``value``, after :func:`check_walk` (the compiled template's comparisons and dict keys call it)."""
    if isinstance(value, CONTAINERS):
        check_walk((value,), what)
    return value
