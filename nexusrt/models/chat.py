"""Chat templates: the Jinja2 program a tokenizer_config.json carries, rendered as HF does.

HF renders with a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, a
``raise_exception`` helper, ``strftime_now`` and a ``tojson`` that does not HTML-escape;
templates in the wild depend on all of these, so we provide the same.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from ..errors import ModelError


def _raise(message: str):
    raise ModelError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ModelError(f"chat template does not compile: {exc}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **special_tokens) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}]``) with ``template``.

    ``special_tokens`` (``bos_token``, ``eos_token``, ...) are visible to the template.
    """
    from jinja2 import TemplateError

    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **special_tokens)
    except TemplateError as exc:
        raise ModelError(f"chat template failed to render: {exc}") from None
