"""A Jinja2 sandbox with limits, for templates that come with a checkpoint.

A chat template is a program from a stranger. jinja2's immutable sandbox stops it from
reaching Python internals or mutating its inputs; it does not stop it from running forever
(nested ``range(100000)`` loops) or allocating gigabytes (``'x' * 10**9``). This module adds,
per render:

- a time limit and a step limit: a trace function counts the lines the template's own
  compiled code runs (every loop iteration runs at least one) and checks the clock, so a
  template that loops, recurses or stalls stops within :attr:`Limits.seconds`;
- a size limit on every string or list the template builds: ``*``, ``+``, ``**``, ``~``
  (concatenation), filter and method results, integer arguments to filters and methods (so
  ``center(10**9)`` is refused before it allocates), and the rendered output itself;
- before the call, the size of what a filter or method would build where one argument multiplies
  another (``join`` of many references to one long string, ``indent`` of many lines by a wide
  margin, ``replace``, ``expandtabs``) and the widths written inside format strings
  (``"%09999999d" | format(1)``, ``"{:>999999999}".format(1)``): these allocate before any result
  can be measured.

A template that breaks a limit raises :class:`~nexusrt.errors.ModelError` naming the
template's file and the limit; so does any error the template raises while rendering.
"""

from __future__ import annotations

import contextvars
import functools
import operator
import re
import sys
import time
from dataclasses import dataclass

from ..errors import ModelError

_TEMPLATE_FILENAME = "<template>"  # what jinja2 names the code it compiles from a string


@dataclass(frozen=True)
class Limits:
    """Bounds for one render. ``max_chars`` bounds every value built and the output."""

    max_chars: int = 4 * 1024 * 1024
    max_steps: int = 2_000_000
    seconds: float = 2.0


class TemplateLimitError(Exception):
    """Raised inside a render that broke a limit (turned into a ModelError naming the file)."""


_limits: contextvars.ContextVar[Limits] = contextvars.ContextVar("nexusrt_template_limits", default=Limits())


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(value, what: str):
    limit = _limits.get().max_chars
    if _size(value) > limit:
        raise TemplateLimitError(f"{what} built a value of {_size(value)} items, over the {limit} limit")
    return value


def _check_int_args(args, kwargs, what: str) -> None:
    # A width, count or repeat argument is how a filter or method is made to allocate:
    # no legitimate one in a chat template exceeds the output limit.
    limit = _limits.get().max_chars
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise TemplateLimitError(f"{what} was given {a}, over the {limit} limit")


def _format_widths(fmt: str, what: str) -> None:
    # A width or precision inside a format string allocates as much as the number says.
    limit = _limits.get().max_chars
    for digits in re.findall(r"\d+", fmt):
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise TemplateLimitError(f"{what} writes the width {digits[:20]} in a format string, over the {limit} limit")


def _predict(name: str, value, args, kwargs, what: str) -> None:
    """Refuse, before it runs, a filter or str method (``value`` its subject) whose result would be
    over the limit although no single argument is."""
    if not isinstance(value, str) and name != "join":
        return
    arg = lambda i, key, default: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    size = 0
    if name == "join" and isinstance(value, (list, tuple)):  # str.join(seq): value is the separator's seq
        sep = arg(0, "d", "") if isinstance(arg(0, "d", ""), str) else ""
        size = sum(_size(v) for v in value) + len(sep) * len(value)
    elif name == "join" and isinstance(value, str) and args and isinstance(args[0], (list, tuple)):
        size = sum(_size(v) for v in args[0]) + len(value) * len(args[0])
    elif name == "indent" and isinstance(arg(0, "width", 4), int):
        size = len(value) + (value.count("\n") + 1) * abs(arg(0, "width", 4))
    elif name == "replace" and isinstance(arg(0, "old", None), str) and isinstance(arg(1, "new", None), str):
        old, new = arg(0, "old", None), arg(1, "new", None)
        size = len(value) + (len(value) + 1 if old == "" else value.count(old)) * len(new)
    elif name == "expandtabs" and isinstance(arg(0, "tabsize", 8), int):
        size = len(value) + value.count("\t") * abs(arg(0, "tabsize", 8))
    elif name in ("format", "format_map"):
        _format_widths(value, what)
    if size > _limits.get().max_chars:
        raise TemplateLimitError(f"{what} would build a value of {size} items, over the {_limits.get().max_chars} limit")


def _bounded_list(items, what: str) -> list:
    """``items`` (a generator) as a list, stopped as soon as the join of it would be over the limit:
    a generator may make a new long string per item (``map('lower')``)."""
    out, size, limit = [], 0, _limits.get().max_chars
    for item in items:
        out.append(item)
        size += max(1, _size(item))
        if size > limit:
            raise TemplateLimitError(f"{what} would build a value of more than {limit} items, over the limit")
    return out


def _subject(args):
    """A filter's value: its first argument after the context jinja passes to pass_* filters."""
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    rest = list(args)
    while rest and isinstance(rest[0], (EvalContext, Context, Environment)):
        rest.pop(0)
    return (rest[0], rest[1:]) if rest else (None, [])


def _limited_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment markers
    def wrapper(*args, **kwargs):
        what = f"filter {name!r}"
        _check_int_args(args, kwargs, what)
        value, rest = _subject(args)
        if name == "join" and value is not None and not isinstance(value, (str, list, tuple, dict)):
            listed = _bounded_list(value, what)  # a generator (map, select): sized once it is a list
            args = tuple(listed if a is value else a for a in args)
            value = listed
        _predict(name, value, rest, kwargs, what)
        return _check_size(fn(*args, **kwargs), what)
    return wrapper


def _limited_join(join):
    def wrapper(seq):
        parts = list(seq)
        if sum(_size(p) if isinstance(p, str) else 0 for p in parts) > _limits.get().max_chars:
            raise TemplateLimitError(f"string concatenation (~) over the {_limits.get().max_chars}-character limit")
        return join(parts)
    return wrapper


def make_environment(**options):
    """An ImmutableSandboxedEnvironment whose operators, filters and calls are size-checked."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        # Intercepting also stops jinja from folding `10**10**10` at compile time.
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, op, left, right):
            if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and abs(left) > 1 and right * abs(left).bit_length() > 64 * 1024:
                raise TemplateLimitError(f"{left} ** {right} is too large to compute")
            if op == "*":
                for seq, n in ((left, right), (right, left)):
                    if _size(seq) and isinstance(n, int) and _size(seq) * n > _limits.get().max_chars:
                        raise TemplateLimitError(f"a value repeated {n} times is over the "
                                                 f"{_limits.get().max_chars} limit")
            if op == "+" and _size(left) + _size(right) > _limits.get().max_chars:
                raise TemplateLimitError(f"'+' over the {_limits.get().max_chars} limit")
            return {"*": operator.mul, "**": operator.pow, "+": operator.add}[op](left, right)

        def wrap_str_format(self, value):
            # jinja hands a template str.format / format_map as its own wrapper (no __self__ by the
            # time it is called), so the format string's widths are checked here.
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt, what = value.__self__, f"call of {value.__name__!r}"

            @functools.wraps(wrapped)
            def checked(*args, **kwargs):
                _format_widths(fmt, what)
                return wrapped(*args, **kwargs)
            return checked

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own spelling)
            name = getattr(__obj, "__name__", type(__obj).__name__)
            what = f"call of {name!r}"
            _check_int_args(args, kwargs, what)
            if isinstance(getattr(__obj, "__self__", None), str):  # a str method: "x".join(...), .format(...)
                _predict(name, __obj.__self__, args, kwargs, what)
            return _check_size(super().call(__context, __obj, *args, **kwargs), what)

    return LimitedSandbox(**options)


def finish_environment(env) -> None:
    """Wrap every filter (after the caller added its own) in the size checks."""
    env.filters = {name: _limited_filter(name, fn) for name, fn in env.filters.items()}


def compile_template(env, source_text: str, source: str):
    """Compile ``source_text``; a syntax error names ``source``."""
    from jinja2 import TemplateError

    try:
        template = env.from_string(source_text)
    except TemplateError as exc:
        raise ModelError(f"{source}: chat template does not compile: {exc}") from None
    except (RecursionError, MemoryError, TemplateLimitError) as exc:  # absurdly nested or folded source
        raise ModelError(f"{source}: chat template does not compile: {type(exc).__name__}: {exc}") from None
    # The compiled code joins `~` concatenations through these module globals.
    ns = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in ns:
            ns[name] = _limited_join(ns[name])
    return template


class _Tracer:
    """Counts lines run by template code and checks the clock; raises past either limit."""

    def __init__(self, limits: Limits):
        self.limits, self.steps = limits, 0
        self.deadline = time.monotonic() + limits.seconds

    def global_trace(self, frame, event, arg):
        self._tick()
        return self.local_trace if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def local_trace(self, frame, event, arg):
        if event == "line":
            self._tick()
        return self.local_trace

    def _tick(self):
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise TemplateLimitError(f"it ran more than {self.limits.max_steps} steps (a loop too long?)")
        if self.steps % 512 == 0 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {self.limits.seconds} s")


def render_limited(template, source: str, limits: Limits | None = None, **context) -> str:
    """Render ``template`` with ``context`` under ``limits``; every failure names ``source``."""
    limits = limits or Limits()
    token = _limits.set(limits)
    tracer = _Tracer(limits)
    previous = sys.gettrace()
    sys.settrace(tracer.global_trace)  # this thread only
    try:
        out, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > limits.max_chars:
                raise TemplateLimitError(f"output over the {limits.max_chars}-character limit")
            out.append(chunk)
        return "".join(out)
    except TemplateLimitError as exc:
        raise ModelError(f"{source}: chat template stopped: {exc}") from None
    except ModelError as exc:  # raise_exception() in the template
        raise ModelError(f"{source}: {exc}") from None
    except Exception as exc:  # any error of the template's own code (ZeroDivisionError, ...)
        raise ModelError(f"{source}: chat template failed to render: {type(exc).__name__}: {exc}") from None
    finally:
        sys.settrace(previous)
        _limits.reset(token)
