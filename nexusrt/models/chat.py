"""Chat templates: the Jinja2 program a tokenizer_config.json carries, rendered as HF does.

HF renders with a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, a
``raise_exception`` helper, ``strftime_now`` and a ``tojson`` that does not HTML-escape;
templates in the wild depend on all of these, so we provide the same. The environment is
:mod:`nexusrt.models.template`'s limited sandbox: a template that loops too long or builds
too much is stopped with an error naming its file.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from ..errors import ModelError
from .template import Limits, compile_template, finish_environment, make_environment, render_limited


def _raise(message: str):
    raise ModelError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(text: str, source: str):
    env = make_environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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
    return render_limited(_compile(template, source), source, limits, messages=messages,
                          add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                          **special_tokens)
