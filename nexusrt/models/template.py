"""A Jinja2 sandbox with limits, for templates that come with a checkpoint.

A chat template is a program from a stranger. jinja2's immutable sandbox stops it from
reaching Python internals or mutating its inputs; it does not stop it from running forever
(nested ``range(100000)`` loops) or allocating gigabytes (``'x' * 10**9``). This module adds,
per render:

- a time limit and a step limit: a trace function counts the lines the template's own
  compiled code runs (every loop iteration runs at least one) and checks the clock, so a
  template that loops, recurses or stalls stops within :attr:`Limits.seconds`;
- a size limit on every value the template builds, checked before it is built where building it
  alone could take gigabytes: ``*``, ``+``, ``%``, ``~`` (concatenation), filter and method results,
  integer arguments to filters and methods (so ``center(10**9)`` is refused before it allocates),
  the joins of blocks and macros, and the rendered output itself;
- the size of a value as text is what turning it into text would produce: a list holds the repr of
  each item, recursively (``[s] * n`` is ``n`` copies of ``s``'s text, although only ``n``
  references), counted without building it and no further than just past the limit. ``~``,
  ``{{ value }}``, ``string``, ``join``, ``tojson``, ``%s`` and ``{}`` are sized so before they run;
- before the call, the size of what a filter or method would build where one argument multiplies
  another (``join`` of many references to one long string, ``indent`` of many lines by a wide
  margin, ``replace``, ``expandtabs``, ``translate``, ``wordwrap``, ``sum`` of lists) and the widths
  in format strings (``"%09999999d" % 1``, ``"{:>{}}".format(1, "999999999")``: a width nested in a
  ``{}`` field is checked once the argument is in it): these allocate before any result can be measured;
- integers of at most :data:`MAX_INT_BITS` bits: ``*`` and ``**`` of bigger ones take minutes in C
  code that no trace function or Ctrl-C interrupts;
- what comparisons, hashes and sorts would walk, checked before they run (the same C code follows
  every reference of ``[x, x]`` nested forty times: 2**41 items): :mod:`nexusrt.models.template_walks`;
- what a render builds in all: :data:`~nexusrt.models.template_sizes.BUILT_FACTOR` times the limit on
  one value (a loop that keeps each new long string it makes stays within every single-value limit).

The sizes are worked out in :mod:`nexusrt.models.template_sizes`. A template that breaks a limit raises :class:`~nexusrt.errors.ModelError` naming the
template's file and the limit; so does any error the template raises while rendering.
"""

from __future__ import annotations

import functools
import sys
import time
import types

from ..errors import ModelError
from .template_sizes import (BINOPS, BuiltCount, BUILT_FACTOR, check_int_args, check_int_op, check_size, check_text,
                             checked_output, count_built, current_built, current_limits, format_widths,
                             limited_filter, limited_join, Limits, listed, percent_size, pprint_limited, predict,
                             refuse_over, size_of, TemplateLimitError, text_size)
from .template_walks import CONTAINERS, check_walk, code_generator_class, walk_checked_filter, walk_checked_test, walked

_TEMPLATE_FILENAME = "<template>"  # what jinja2 names the code it compiles from a string


def make_environment(**options):
    """An ImmutableSandboxedEnvironment whose operators, filters, calls and output are size-checked."""
    from jinja2.runtime import LoopContext, Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from markupsafe import Markup

    class LimitedFormatter(SandboxedFormatter):
        """str.format's formatter, counting what it has built: each field is sized once its format
        spec is resolved (``"{:>{}}"`` takes its width from an argument) and before it is formatted."""

        def __init__(self, env, what: str, **kwargs):
            super().__init__(env, **kwargs)
            self.what, self.size = what, 0

        def vformat(self, format_string, args, kwargs):
            self.size = len(format_string)
            return super().vformat(format_string, args, kwargs)

        def convert_field(self, value, conversion):
            if conversion is not None:  # !r !s !a build the text before format_field sees it
                refuse_over(self.size + text_size(value), self.what)
            return super().convert_field(value, conversion)

        def format_field(self, value, format_spec):
            widths = format_widths(format_spec, self.what)
            self.size += widths + text_size(value) + (310 if isinstance(value, float) else 0)
            refuse_over(self.size, self.what)
            return super().format_field(value, format_spec)

    class LimitedEscapeFormatter(LimitedFormatter, SandboxedEscapeFormatter):
        pass

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        # Every arithmetic operator (`%` formats strings too); intercepting also stops jinja from
        # folding `10**10**10` or `"%09999999999d" % 1` at compile time.
        intercepted_binops = frozenset(BINOPS)
        # Comparison operands and dict-literal keys go through walked() (template_walks.py).
        code_generator_class = code_generator_class()
        walked = staticmethod(walked)

        @staticmethod
        def concat(parts):
            # Blocks ({% set %}...{% endset %}), macros and {% filter %} join their output here, not
            # through render_limited's count: many references to one long string would make gigabytes.
            parts = parts if isinstance(parts, list) else list(parts)
            size = sum(map(len, parts))
            refuse_over(size, "a block's output")
            count_built(size, "a block's output")
            return "".join(parts)

        def call_binop(self, context, op, left, right):
            limit = current_limits.get().max_chars
            if isinstance(left, int) and isinstance(right, int):
                if op != "**" and abs(left) >> 64 == 0 and abs(right) >> 64 == 0:
                    return BINOPS[op](left, right)  # the common case (loop.index0 % 2), at no cost
                check_int_op(op, left, right)
            elif op == "*":
                # A list repeated is references repeated (its text is sized where text is made of it).
                for seq, n in ((left, right), (right, left)):
                    if size_of(seq) and isinstance(n, int) and size_of(seq) * n > limit:
                        raise TemplateLimitError(f"a value repeated {n} times is over the {limit} limit")
            elif op == "+" and size_of(left) + size_of(right) > limit:
                raise TemplateLimitError(f"'+' over the {limit} limit")
            elif op == "%" and isinstance(left, (str, bytes)):
                refuse_over(percent_size(left, right, "'%'"), "'%'")
            return check_size(BINOPS[op](left, right), f"'{op}'")

        def wrap_str_format(self, value):
            # jinja hands a template str.format / format_map as a wrapper around a formatter of its own;
            # this is the same wrapper (jinja 3.1's) around ours.
            if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                    or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
                return None
            fmt, name = value.__self__, value.__name__

            def wrapper(*args, **kwargs):
                if name == "format_map":
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument")
                    args, kwargs = (), args[0]
                what = f"call of {name!r}"
                formatter = LimitedEscapeFormatter(self, what, escape=fmt.escape) if isinstance(fmt, Markup) \
                    else LimitedFormatter(self, what)
                return type(fmt)(formatter.vformat(fmt, args, kwargs))
            return functools.update_wrapper(wrapper, value)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own spelling)
            name = getattr(__obj, "__name__", type(__obj).__name__)
            what = f"call of {name!r}"
            if not isinstance(__obj, Macro):  # a macro may test its argument: left as it is
                args = tuple(listed(args, what))
                kwargs = dict(zip(kwargs, listed(kwargs.values(), what)))
            check_int_args(args, kwargs, what)
            subject = getattr(__obj, "__self__", None)
            if isinstance(subject, CONTAINERS + (LoopContext,)) or __obj is dict or subject is dict:
                check_walk((*args, *kwargs.values(), subject), what)  # .index .count .get loop.changed dict()
            if isinstance(subject, (str, bytes)):  # a str method: "x".join(...), .replace(...)
                if isinstance(subject, Markup):  # Markup's methods escape (turn into text) their arguments
                    check_text((*args, *kwargs.values()), what)
                predict(name, subject, args, kwargs, what, method=True)
            return check_size(super().call(__context, __obj, *args, **kwargs), what)

    return LimitedSandbox(finalize=checked_output, **options)


def finish_environment(env) -> None:
    """Wrap every filter (after the caller added its own) in the size checks; ``pprint`` becomes
    one that writes within the limit."""
    if "pprint" in env.filters:
        env.filters["pprint"] = pprint_limited
    env.filters = {name: walk_checked_filter(name, limited_filter(name, fn)) for name, fn in env.filters.items()}
    env.tests = {name: walk_checked_test(name, fn) for name, fn in env.tests.items()}


def compile_template(env, source_text: str, source: str):
    """Compile ``source_text``; a syntax error names ``source``."""
    from jinja2 import TemplateError

    try:
        template = env.from_string(source_text)
    except TemplateError as exc:
        raise ModelError(f"{source}: chat template does not compile: {exc}") from None
    except (RecursionError, MemoryError, ValueError, TemplateLimitError) as exc:  # absurdly nested or folded source
        # (ValueError: an integer literal too long for the compiler to write back as decimal)
        raise ModelError(f"{source}: chat template does not compile: {type(exc).__name__}: {exc}") from None
    # The compiled code joins `~` concatenations through these module globals.
    ns = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in ns:
            ns[name] = limited_join(ns[name])
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
    token = current_limits.set(limits)
    built_token = current_built.set(BuiltCount(BUILT_FACTOR * limits.max_chars))
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
        current_built.reset(built_token)
        current_limits.reset(token)
