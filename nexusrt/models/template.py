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
  ``center(10**9)`` is refused before it allocates), and the rendered output itself.

A template that breaks a limit raises :class:`~nexusrt.errors.ModelError` naming the
template's file and the limit; so does any error the template raises while rendering.
"""

from __future__ import annotations

import contextvars
import functools
import operator
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


def _limited_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment markers
    def wrapper(*args, **kwargs):
        _check_int_args(args, kwargs, f"filter {name!r}")
        return _check_size(fn(*args, **kwargs), f"filter {name!r}")
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

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own spelling)
            what = f"call of {getattr(__obj, '__name__', type(__obj).__name__)!r}"
            _check_int_args(args, kwargs, what)
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
