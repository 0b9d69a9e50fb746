"""Chat templates: the Jinja2 program a tokenizer_config.json carries, rendered as HF does.

HF renders with a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, a
``raise_exception`` helper, ``strftime_now``, a ``tojson`` that does not HTML-escape and the
``{% generation %}`` tag; templates in the wild depend on all of these, so we provide the same.
The environment is :mod:`nexusrt.models.template`'s limited sandbox: a template that loops too
long or builds too much is stopped with an error naming its file.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from ..errors import ModelError
from .template import Limits, compile_template, finish_environment, make_environment, render_limited
from .template_sizes import TemplateLimitError, join_limited, text_of

MAX_JSON_INDENT = 256  # the encoder builds "\n" + indent * depth at each level before we can count it


def _raise(message: str):
    raise ModelError(f"chat template error: {text_of(message, 'raise_exception')}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # json.dumps's text, as the encoder yields it piece by piece, so that a list of many references
    # to one long string is refused at the limit instead of after building gigabytes.
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > MAX_JSON_INDENT:
        raise TemplateLimitError(f"filter 'tojson' was given the indent {width}, over the {MAX_JSON_INDENT} limit")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    return join_limited(encoder.iterencode(value), "filter 'tojson'")


@lru_cache(maxsize=None)
def _generation_tag():
    """transformers' ``{% generation %}...{% endgeneration %}`` (its AssistantTracker), which marks
    the assistant's text for a training mask. We never build that mask, so the body renders as it
    is, as transformers renders it when no mask is asked for."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            # A call block, as transformers builds it: a {% set %} inside stays inside, as there.
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


@lru_cache(maxsize=8)
def _compile(text: str, source: str):
    env = make_environment(trim_blocks=True, lstrip_blocks=True,
                           extensions=[_generation_tag(), "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    finish_environment(env)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return compile_template(env, text, source)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                source: str = "chat template", limits: Limits | None = None, **special_tokens) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}]``) with ``template``.

    ``special_tokens`` (``bos_token``, ``eos_token``, ...) are visible to the template;
    ``source`` (the template's file) is named in every error. The output may be up to four
    times the messages' text plus 1 MiB (``limits`` overrides the bounds).
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if limits is None:
        text = sum(len(str(m.get("content", ""))) for m in messages)
        limits = Limits(max_chars=max(Limits.max_chars, 4 * text + (1 << 20)))
    # A special token given as None or "" is one the checkpoint does not set: transformers leaves
    # such a token out of the template's variables (`unk_token is defined` is false there).
    special_tokens = {k: v for k, v in special_tokens.items() if v is not None and v != ""}
    return render_limited(_compile(template, source), source, limits, messages=messages,
                          add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                          **special_tokens)
