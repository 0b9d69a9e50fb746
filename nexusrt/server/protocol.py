"""The OpenAI request bodies the server accepts, checked field by field.

Every problem raises :class:`BadRequest` naming the field (``param``), which the app turns
into HTTP 400 with OpenAI's error body. Unknown fields are ignored, as OpenAI's clients send
some we do not use (``user``, ``metadata``, ...); a field of OpenAI's that would change the answer
and that this server does not implement (``logprobs``, ``echo``, penalties, ``tools``, ...) is
refused by name unless it holds its no-op value, rather than silently ignored. ``null`` is the
field left out, everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..engine.context import Context

CONTEXT_FIELD = "nexusrt_context"  # extension: the layered context (engine/context.py) as the prompt
KV_FIELD = "nexusrt_kv"  # extension: {policy, budget, sinks, window, protect} KV pruning of this request
KV_KEYS = ("policy", "budget", "sinks", "window", "protect")
MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 64  # choices one request may ask for: prompts (a completions list) times n
DEFAULT_MAX_TOKENS = {False: 16, True: 256}  # completions (OpenAI's default), chat
ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system
# OpenAI's fields this server does not implement, with the values that ask for nothing.
UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
               "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
               "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],),
               "tool_choice": ("none", "auto"), "function_call": ("none", "auto")}


class BadRequest(Exception):
    """A request the server refuses with HTTP ``status``; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """What to generate: ``prompts`` holds text (completions: one, or the list it was sent), one
    list of messages (chat) or one :class:`~nexusrt.engine.context.Context` (the
    ``nexusrt_context`` extension, either endpoint); ``n`` choices each, choice ``p * n + i``
    being prompt ``p``'s ``i``-th (OpenAI's order)."""

    model: str
    prompts: list
    chat: bool
    max_tokens: int | None  # None: up to DEFAULT_MAX_TOKENS, as many as the context leaves
    sampling: dict = field(default_factory=dict)  # temperature, top_k, top_p, seed (None: the model's default)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    kv: dict = field(default_factory=dict)  # kv_* pruning options from nexusrt_kv
    n: int = 1

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _number(body, name, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a number, got {json.dumps(v)[:40]}", name)
    if v < lo or (lo_open and v == lo) or v > hi:
        lo_txt = f"({lo}" if lo_open else f"[{lo}"
        raise BadRequest(f"'{name}' must be in {lo_txt}, {hi}], got {v}", name)
    return float(v)


def _integer(body, name, lo, hi):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(v)[:40]}", name)
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def _text(v, name) -> str:
    if not isinstance(v, str):
        raise BadRequest(f"'{name}' must be a string", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{name}' is not valid UTF-8 text", name) from None
    return v


def _content(m: dict, i: int) -> str:
    """A message's text: a string, a list of text parts (joined by newlines), or null for an
    assistant turn (one that only called tools)."""
    where, c = f"messages[{i}].content", m.get("content")
    if c is None and m["role"] == "assistant":
        return ""
    if not isinstance(c, list):
        return _text(c, where)
    texts = []
    for j, part in enumerate(c):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRequest(f"{where}[{j}] is a {kind!r} part; this server takes text parts only "
                             "({\"type\": \"text\", \"text\": ...})", f"{where}[{j}]")
        texts.append(_text(part.get("text"), f"{where}[{j}].text"))
    return "\n".join(texts)


def _ids(p) -> bool:
    """Whether ``p`` is one token-id prompt: a non-empty list of integers."""
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _prompts(p) -> list:
    """``/v1/completions``' prompt as OpenAI takes it: a string, a list of token ids, or a list of
    1 to ``MAX_CHOICES`` of either (a choice, or ``n``, for each). Token ids go to the model as
    they are (the engine checks them against the vocabulary)."""
    if isinstance(p, str):
        return [_text(p, "prompt")]
    if _ids(p):
        return [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) or _ids(x) for x in p):
        raise BadRequest("'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")
    if len(p) > MAX_CHOICES:
        raise BadRequest(f"'prompt' holds {len(p)} prompts; this server takes at most {MAX_CHOICES} in one request",
                         "prompt")
    return [_text(x, f"prompt[{i}]") if isinstance(x, str) else x for i, x in enumerate(p)]


def _same(v, n) -> bool:
    """JSON equality: 0 and 0.0 agree, false and 0 do not."""
    if isinstance(v, bool) or isinstance(n, bool):
        return v is n
    return v == n and isinstance(v, (int, float)) == isinstance(n, (int, float))


def _unsupported(body: dict) -> None:
    for name, no_op in UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and not any(_same(v, n) for n in no_op):
            raise BadRequest(f"'{name}' is not supported by this server (it would be ignored); leave it out",
                             name)


def _context(body: dict, chat: bool):
    """The ``nexusrt_context`` extension: an :class:`nrt.Context` object in place of messages/prompt."""
    other = "messages" if chat else "prompt"
    if body.get(other) is not None:
        raise BadRequest(f"give either '{other}' or '{CONTEXT_FIELD}', not both", CONTEXT_FIELD)
    try:
        return Context.from_dict(body[CONTEXT_FIELD])
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"'{CONTEXT_FIELD}': {exc}", CONTEXT_FIELD) from None


def _kv(body: dict) -> dict:
    """The ``nexusrt_kv`` extension as ``kv_*`` keyword arguments (their values are checked by the LLM)."""
    kv = body.get(KV_FIELD)
    if kv is None:
        return {}
    if not isinstance(kv, dict) or set(kv) - set(KV_KEYS):
        raise BadRequest(f"'{KV_FIELD}' must be an object with keys among {', '.join(KV_KEYS)}", KV_FIELD)
    return {f"kv_{k}": v for k, v in kv.items()}


def parse(body: dict, chat: bool, model_id: str, max_context: int) -> Completion:
    """Check an OpenAI ``/v1/completions`` (``chat`` False) or ``/v1/chat/completions`` body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", "model")
    if model != model_id:
        raise BadRequest(f"the model {model!r} does not exist here; this server serves {model_id!r}", "model",
                         kind="model_not_found")
    if body.get(CONTEXT_FIELD) is not None:
        prompt = _context(body, chat)
    elif chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
        prompt = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}",
                                 f"messages[{i}].role")
            role = "system" if m["role"] == "developer" else m["role"]
            prompt.append({"role": role, "content": _content(m, i)})
    else:
        prompt = _prompts(body.get("prompt"))
    _unsupported(body)
    n = _integer(body, "n", 1, MAX_CHOICES) or 1
    prompts = prompt if not chat and isinstance(prompt, list) else [prompt]
    if len(prompts) * n > MAX_CHOICES:
        raise BadRequest(f"{len(prompts)} prompts times n={n} is {len(prompts) * n} choices; this server takes at "
                         f"most {MAX_CHOICES} in one request", "n")
    max_tokens = _integer(body, "max_tokens", 1, max_context)  # None: the default, fitted by the app
    if chat and body.get("max_completion_tokens") is not None:  # OpenAI's newer name wins
        max_tokens = _integer(body, "max_completion_tokens", 1, max_context)
    top_k = _integer(body, "top_k", -1, 1 << 31)
    sampling = {"temperature": _number(body, "temperature", 0, 2),
                "top_p": _number(body, "top_p", 0, 1, lo_open=True),
                "top_k": None if top_k is None else max(top_k, 0),  # -1 (vLLM's "off") is our 0
                "seed": _integer(body, "seed", 0, (1 << 64) - 1)}
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stops = [_text(s, "stop") for s in stops]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadRequest("'stream_options' is only for streamed requests (\"stream\": true)", "stream_options")
    options = options or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object with a boolean include_usage", "stream_options")
    return Completion(model, prompts, chat, max_tokens, sampling, stops, bool(stream),
                      bool(options.get("include_usage")), _kv(body), n)


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
