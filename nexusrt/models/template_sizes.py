"""How big a value a chat template's operation would build, found before it is built.

The size half of :mod:`nexusrt.models.template`'s limits (read that module's docstring for the
whole list): the size of a value as text without making the text (:func:`text_size`), the
results of filters and methods where one argument multiplies another (:func:`predict`), the
widths in ``%`` and ``{}`` formats, integers of at most :data:`MAX_INT_BITS` bits, and the
wrappers the sandbox puts around filters, joins and output to apply them. Every check reads the
render's :class:`Limits` from :data:`current_limits` and raises :class:`TemplateLimitError`.
"""

from __future__ import annotations

import contextvars
import functools
import io
import itertools
import math
import operator
import re
import types
from collections.abc import Mapping, MappingView
from dataclasses import dataclass

MAX_INT_BITS = 4096  # far above any chat template's arithmetic; x*x of 16-Mbit numbers takes minutes
_CHUNK = 1 << 16  # a long string's repr is measured this many characters at a time
BINOPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
           "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
# Filters that turn their value and arguments into text (soft_str / str / escape) before working.
_TEXT_FILTERS = frozenset(["capitalize", "center", "e", "escape", "forceescape", "indent", "lower", "pprint",
                           "replace", "safe", "string", "striptags", "title", "trim", "truncate", "upper",
                           "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"])
# Characters str.splitlines() breaks at (indent puts its margin on every line it finds).
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@dataclass(frozen=True)
class Limits:
    """Bounds for one render. ``max_chars`` bounds every value built and the output."""

    max_chars: int = 4 * 1024 * 1024
    max_steps: int = 2_000_000
    seconds: float = 2.0


class TemplateLimitError(Exception):
    """Raised inside a render that broke a limit (turned into a ModelError naming the file)."""


current_limits: contextvars.ContextVar[Limits] = contextvars.ContextVar("nexusrt_template_limits", default=Limits())

# Each value is within the limit, but a loop can keep making new ones (a list grown by a new long
# string per iteration held 2 GB within the 2 s time limit): a render may build this many times the
# limit on one value in all (characters of text, items of lists), counted where check_size looks.
BUILT_FACTOR = 16


class BuiltCount:
    """What one render's operations have built so far, against its cap."""

    def __init__(self, cap: int):
        self.total, self.cap = 0, cap


current_built: contextvars.ContextVar[BuiltCount | None] = contextvars.ContextVar("nexusrt_template_built",
                                                                                 default=None)


def count_built(n: int, what: str) -> None:
    """Add ``n`` items built by ``what`` to the render's total; past its cap, stop the render."""
    built = current_built.get()
    if built is None or not n:
        return
    built.total += n
    if built.total > built.cap:
        _over_built(built, what)


def _over_built(built: BuiltCount, what: str) -> None:
    raise TemplateLimitError(f"{what}: the template has built {built.total} characters and list items in all, "
                             f"over the {built.cap} limit ({BUILT_FACTOR} times the limit on one value)")


def size_of(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def refuse_over(size: int, what: str) -> None:
    limit = current_limits.get().max_chars
    if size > limit:
        raise TemplateLimitError(f"{what} would build a value of about {size} items, over the {limit} limit")


def check_size(value, what: str):
    limit, size = current_limits.get().max_chars, size_of(value)
    if size > limit:
        raise TemplateLimitError(f"{what} built a value of {size} items, over the {limit} limit")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"{what} built an integer of {value.bit_length()} bits, "
                                 f"over the {MAX_INT_BITS}-bit limit")
    if size:  # count_built inlined: this runs on every operation's result, under the trace function
        built = current_built.get()
        if built is not None:
            built.total += size
            if built.total > built.cap:
                _over_built(built, what)
    return value


def check_int_args(args, kwargs, what: str) -> None:
    # A width, count or repeat argument is how a filter or method is made to allocate:
    # no legitimate one in a chat template exceeds the output limit.
    limit = current_limits.get().max_chars
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            shown = a if a.bit_length() <= 64 else f"an integer of {a.bit_length()} bits"
            raise TemplateLimitError(f"{what} was given {shown}, over the {limit} limit")


def _repr_len(s) -> int:
    """``len(repr(s))`` of a str or bytes (to within its quotes), building at most a chunk of it."""
    if isinstance(s, str) and s.isprintable():  # repr then escapes only backslashes and quotes
        return len(s) + 2 + s.count("\\") + s.count("'")
    return 3 + sum(len(repr(s[i:i + _CHUNK])) - 2 for i in range(0, len(s), _CHUNK))


def text_size(value, budget: int | None = None, seen: dict | None = None) -> int:
    """About how many characters ``str(value)`` has, found without building it.

    A string is its length; anything else is its repr, which for lists, tuples, dicts (and their
    views) and namespaces holds the repr of every item, recursively. Counting stops as soon as it is
    past ``budget`` (the limit by default) and an object referenced many times is measured once
    (``seen``, shared by callers that size several values), so the work is bounded by the budget
    however many references a value holds: ``[s] * 10**6`` costs two items, not a million.
    """
    if isinstance(value, str):
        return len(value)
    budget = current_limits.get().max_chars if budget is None else budget
    return _repr_size(value, budget, {} if seen is None else seen)


def _repr_size(value, budget: int, seen: dict) -> int:
    if isinstance(value, (str, bytes)):
        return _repr_len(value)
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2  # at least its decimal digits, and a sign
    if isinstance(value, float):
        return len(repr(value))
    if id(value) in seen:
        return seen[id(value)][1]
    if isinstance(value, Mapping):
        items, size = itertools.chain.from_iterable(value.items()), 2  # "k: v, " is two items and a separator
    elif isinstance(value, (list, tuple, set, frozenset)):
        items, size = value, 2
    elif isinstance(value, MappingView):
        items, size = value, 14  # "dict_items([...])"
    else:
        from jinja2.utils import Namespace

        if isinstance(value, Namespace):  # its repr shows every attribute
            return 12 + _repr_size(value._Namespace__attrs, budget, seen)
        return 64  # loops, macros, cyclers, generators, Undefined: a short fixed repr
    for item in items:
        # Strings and numbers inline: a call per item would cost a trace event each.
        kind = type(item)
        if kind is str and item.isprintable():
            size += len(item) + 4 + item.count("\\") + item.count("'")
        elif kind is int:
            size += item.bit_length() // 3 + 4
        elif kind is float:
            size += len(repr(item)) + 2
        elif item is None or kind is bool:
            size += 7
        else:
            size += 2 + _repr_size(item, budget - size, seen)
        if size > budget:
            break
    seen[id(value)] = (value, size)  # the value kept alive, so that its id is not reused meanwhile
    return size


def check_text(values, what: str) -> None:
    """Refuse turning ``values`` into text if their text together would be over the limit."""
    limit, size, seen = current_limits.get().max_chars, 0, {}
    for v in values:
        size += text_size(v, limit - size, seen)
        refuse_over(size, what)


def text_of(value, what: str) -> str:
    """``str(value)``, refused (:class:`TemplateLimitError`) before it is built if over the limit."""
    check_text((value,), what)
    return str(value)


def join_limited(chunks, what: str) -> str:
    """The concatenation of an iterable of text ``chunks``, refused as soon as it is over the limit."""
    out, size, limit = [], 0, current_limits.get().max_chars
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise TemplateLimitError(f"{what} would build a value of more than {limit} items, over the limit")
        out.append(chunk)
    return "".join(out)


def format_widths(fmt: str, what: str) -> int:
    """The sum of the numbers written in a format string: its widths and precisions (and any other
    digits: an overestimate, never an underestimate however the format nests its keys). One number
    over the limit is refused as it stands, as it allocates as much as it says."""
    limit, total = current_limits.get().max_chars, 0
    for m in re.finditer(r"\d+", fmt):
        digits = m.group()
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise TemplateLimitError(f"{what} writes the width {digits[:20]} in a format string, over the {limit} limit")
        total += int(digits)
        if total > limit:
            break
    return total


def percent_size(fmt, args, what: str) -> int:
    """An upper bound on ``len(fmt % args)``, found without formatting: the format's own text, the
    numbers written in it, every integer a ``*`` may take as a width, and the text of each value
    (a float's ``%f`` may write 310 digits; ``%r`` and ``%a`` at most a few times the text)."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    limit, seen = current_limits.get().max_chars, {}
    size = len(text) + format_widths(text, what)
    if isinstance(args, Mapping):
        # "%(key)s" may name one value any number of times: each use counts as the longest value,
        # and a plain "%s" prints the mapping itself.
        uses, longest = text.count("%("), 0
        size += text_size(args, limit - size, seen)
        for v in args.values():
            longest = max(longest, text_size(v, limit, seen))
            if size + uses * longest > limit:
                break
        return size + uses * longest
    values = args if isinstance(args, tuple) else (args,)
    for v in values:
        size += text_size(v, limit - size, seen) + (310 if isinstance(v, float) else 0)
        if "*" in text and isinstance(v, int) and not isinstance(v, bool):
            size += abs(v)  # "%*d": the width is an argument
        if size > limit:
            break
    return size


def predict(name: str, value, args, kwargs, what: str, method: bool = False) -> None:
    """Refuse, before it runs, a filter or (``method``) str or bytes method whose subject is ``value``
    and whose result would be over the limit although no single argument is: one multiplies another."""
    limit = current_limits.get().max_chars
    arg = lambda i, key, default: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    size = 0
    if name == "join":  # every item's text, and the separator between each two
        seq, sep = (arg(0, "iterable", None), value) if method else (value, arg(0, "d", ""))
        if isinstance(seq, (list, tuple)):
            size, seen = text_size(sep) * max(len(seq) - 1, 0), {}
            for item in seq:
                size += text_size(item, limit - size, seen)
                if size > limit:
                    break
    elif name == "replace":
        old, new, count = arg(0, "old", None), arg(1, "new", None), arg(2, "count", None)
        if isinstance(value, str) and isinstance(old, str) or isinstance(value, bytes) and isinstance(old, bytes):
            hits = value.count(old) if old else len(value) + 1
        else:  # the filter replaces in str(value): at most one hit per character
            hits = text_size(value) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        size = text_size(value) + hits * text_size(new)
    elif name == "indent":
        width = arg(0, "width", 4)
        margin = len(width) if isinstance(width, str) else abs(width) if isinstance(width, int) else 0
        lines = sum(map(value.count, _LINE_BREAKS)) if isinstance(value, str) else 0
        size = text_size(value) + (lines + 2) * margin  # + the first line, and `first=True`
    elif name == "wordwrap" and not method:  # each line ends with the wrapstring (a line holds a character)
        wrap, text = arg(2, "wrapstring", None), text_size(value)
        size = text + (text + 1) * (1 if wrap is None else text_size(wrap))
    elif name == "urlize" and not method:  # each link (a word: two characters at least) repeats target and rel
        extra = sum(text_size(a) for a in (arg(2, "target", None), arg(3, "rel", None)) if a is not None)
        size = text_size(value) + (text_size(value) // 2 + 1) * extra
    elif name == "expandtabs" and isinstance(value, (str, bytes)) and isinstance(arg(0, "tabsize", 8), int):
        size = len(value) + value.count("\t" if isinstance(value, str) else b"\t") * abs(arg(0, "tabsize", 8))
    elif name == "translate" and isinstance(value, str) and isinstance(arg(0, "table", None), Mapping):
        longest = max((len(v) for v in arg(0, "table", None).values() if isinstance(v, str)), default=1)
        size = len(value) * max(longest, 1)
    elif name == "sum" and not method and isinstance(arg(1, "start", 0), (list, tuple)):
        # sum(lists, start=[]) builds every partial sum in turn: count them all (quadratic).
        total = size = len(arg(1, "start", 0))
        for item in value if isinstance(value, (list, tuple)) else ():
            total += size_of(item)
            size += total
            if size > limit:
                break
    elif name == "format" and not method:  # the filter: str(value) % args
        if not isinstance(value, str):
            value = text_of(value, what)
        size = percent_size(value, kwargs or tuple(args), what)
    refuse_over(size, what)


def _bounded_list(items, what: str) -> list:
    """``items`` (a generator) as a list, stopped as soon as the text of it would be over the limit:
    a generator may make a new long value per item (``map('lower')``) for a filter to keep them all."""
    out, size, limit, seen = [], 0, current_limits.get().max_chars, {}
    for item in items:
        out.append(item)
        size += max(1, text_size(item, limit - size, seen))
        if size > limit:
            raise TemplateLimitError(f"{what} would build a value of more than {limit} items, over the limit")
    return out


def listed(values, what: str):
    """``values`` (arguments) with every generator among them made a bounded list."""
    return [_bounded_list(v, what) if isinstance(v, types.GeneratorType) else v for v in values]


def _subject(args):
    """A filter's value: its first argument after the context jinja passes to pass_* filters."""
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    rest = list(args)
    while rest and isinstance(rest[0], (EvalContext, Context, Environment)):
        rest.pop(0)
    return (rest[0], rest[1:]) if rest else (None, [])


def limited_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment markers
    def wrapper(*args, **kwargs):
        what = f"filter {name!r}"
        # A generator (map, select, ...) may make new values per item: listed within the limit first.
        args = tuple(listed(args, what))
        kwargs = dict(zip(kwargs, listed(kwargs.values(), what)))
        check_int_args(args, kwargs, what)
        value, rest = _subject(args)
        if name == "int" and isinstance(value, (str, bytes)) and len(value) > MAX_INT_BITS:
            raise TemplateLimitError(f"{what} was given a string of {len(value)} characters, "
                                     f"over the {MAX_INT_BITS}-digit limit for a number")
        if name in _TEXT_FILTERS:
            check_text((value, *rest, *kwargs.values()), what)
        predict(name, value, rest, kwargs, what)
        return check_size(fn(*args, **kwargs), what)
    return wrapper


def limited_join(join):
    def wrapper(seq):
        # `a ~ b` turns each operand into text: a list of references to one long string is sized
        # as the text it would make, before making it.
        parts, limit, size, seen = list(seq), current_limits.get().max_chars, 0, {}
        for part in parts:
            size += text_size(part, limit - size, seen)
            if size > limit:
                raise TemplateLimitError(f"string concatenation (~) over the {limit}-character limit")
        count_built(size, "string concatenation (~)")
        return join(parts)
    return wrapper


def checked_output(value):
    """jinja's ``finalize``: ``{{ value }}`` writes ``str(value)``, sized first when not a string."""
    if not isinstance(value, str):
        check_text((value,), "output")
    return value


def check_int_op(op: str, left: int, right: int) -> None:
    """Refuse integer arithmetic on or to more than MAX_INT_BITS bits, before computing it."""
    bits = max(abs(left).bit_length(), abs(right).bit_length())
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"'{op}' was given an integer of {bits} bits, over the {MAX_INT_BITS}-bit limit")
    if op == "*":
        bits = abs(left).bit_length() + abs(right).bit_length()
    elif op == "**" and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"'{op}' would make an integer of about {int(bits)} bits, over the "
                                 f"{MAX_INT_BITS}-bit limit: too large to compute")


def pprint_limited(value) -> str:
    """jinja's ``pprint`` filter, written into a buffer that refuses text past the limit: indentation
    (every line of a value under a long dict key) can make it far longer than the repr sized first."""
    import pprint

    limit = current_limits.get().max_chars

    class Capped(io.StringIO):
        def write(self, s):
            if self.tell() + len(s) > limit:
                raise TemplateLimitError(f"filter 'pprint' over the {limit}-character limit")
            return super().write(s)

    out = Capped()
    pprint.PrettyPrinter(stream=out).pprint(value)  # pformat's text, and a newline
    return out.getvalue()[:-1]
