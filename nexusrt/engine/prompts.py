"""Prompts from outside: text and chat messages checked, shaped and tokenized for ``nrt.LLM``."""

from __future__ import annotations

import numbers
import time

from ..reference.sampling import SamplingParams
from ..errors import InvalidArgument, InvalidArgumentType, NexusRTError
from .context import Context, Rendered, check_text, render
from .kv import Pruned
from .kv import shape as kv_shape
from .session import Session


EXACT_COUNT_CHARS = 1 << 18  # a prompt this long or shorter is tokenized (well under a second) for an exact count


class PromptTooLong(InvalidArgument):
    """The prompt alone is longer than the context: ``tokens`` of it against ``limit``."""

    def __init__(self, tokens: int, limit: int, source: str, at_least: bool = False):
        self.tokens, self.limit, self.at_least = tokens, limit, at_least
        count = f"at least {tokens} tokens (from its length, not tokenized)" if at_least else f"{tokens} tokens"
        super().__init__("prompt", f"the prompt is {count} but the context holds {limit} "
                                   f"(max_position_embeddings in {source}, or max_context)")


def messages_for(prompt, chat: bool, system: str | None):
    """The text prompt, or with ``chat``/``system`` the messages to render."""
    if not isinstance(prompt, str):
        raise InvalidArgumentType("prompt", "prompt must be a string or a list of strings, "
                                            f"got {type(prompt).__name__}")
    check_text(prompt, "the prompt")
    if not chat and system is None:
        return prompt
    return chat_messages([{"role": "user", "content": prompt}], system)


def prompt_for(prompt, chat: bool, system: str | None, tokenizer, kv: dict | None = None):
    """Text or an :class:`~nexusrt.engine.context.Context` as what :func:`start_session` tokenizes; a
    context is checked against its layer budgets here, before any work (it renders its own chat form).
    ``kv`` (the call's ``kv_*`` options) wraps it in :class:`~nexusrt.engine.kv.Pruned` when it prunes."""
    if isinstance(prompt, Context):
        if system is not None:
            raise InvalidArgument("system", "a Context carries its own system layer; do not pass system= with it")
        shaped = render(prompt, tokenizer)
    else:
        shaped = messages_for(prompt, chat, system)
    return kv_shape(shaped, kv or {}, tokenizer)


class TokenIds(tuple):
    """A prompt given as token ids (not tokenized again; checked against the vocabulary)."""


def request_prompt(prompt, tokenizer, kv: dict):
    """What ``LLM.submit`` / ``prepare`` take, checked and shaped like :func:`prompt_for`: text, a
    list of chat messages (rendered with the chat template), a list of token ids, or a Context."""
    if isinstance(prompt, list) and not prompt:  # neither a conversation nor ids: nothing to generate from
        raise InvalidArgument("prompt", "the prompt is an empty list: give at least one chat message or token id")
    if isinstance(prompt, list) and all(_is_id(t) for t in prompt):
        return kv_shape(TokenIds(int(t) for t in prompt), kv, tokenizer)
    if isinstance(prompt, list):
        return kv_shape(chat_messages(prompt, None), kv, tokenizer)
    if not isinstance(prompt, (str, Context)):
        raise InvalidArgumentType("prompt", "prompt must be text, a list of chat messages, a list of token ids or "
                                            f"an nrt.Context, got {type(prompt).__name__}")
    return prompt_for(prompt, False, None, tokenizer, kv)


def _is_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def chat_messages(messages, system: str | None, argument: str = "prompt") -> list[dict]:
    """``messages`` checked (and ``system`` put first when given); errors name ``argument``, the
    caller's name for the list (``submit``'s ``prompt``, ``chat``'s ``messages``). A chat needs at
    least one message: an empty list is refused (``system`` alone is not a conversation)."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InvalidArgumentType(argument, "messages must be a list of {'role': str, 'content': str} dicts")
    if not messages:
        raise InvalidArgument(argument, "messages is empty: a chat needs at least one message "
                                        "(e.g. [{'role': 'user', 'content': ...}])")
    for i, m in enumerate(messages):
        check_text(m["content"], f"message {i}", argument)
    if system is not None:
        if not isinstance(system, str):
            raise InvalidArgumentType("system", f"system must be a string, got {type(system).__name__}")
        check_text(system, "the system prompt", "system")
        messages = [{"role": "system", "content": system}] + list(messages)
    return messages


def _checked_ids(ids: TokenIds, vocab: int) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidArgument("prompt", f"token id {bad} is outside this model's vocabulary [0, {vocab})")
    return list(ids)


def check_generation(model, max_new_tokens, temperature, top_k, top_p, stop, seed):
    """Check a call's generation arguments: ``(max_new_tokens, stop strings, resolved SamplingParams)``."""
    if isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool):
        max_new_tokens = int(max_new_tokens)  # a NumPy integer is fine
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentType("stop", f"stop must be a string or a list of strings, got {stop!r:.60}")
    stops = list(stops)
    for s in stops:
        check_text(s, "a stop string", "stop")
    gen = model.generation
    params = SamplingParams(
        temperature=gen.temperature if temperature is None else temperature,
        top_k=gen.top_k if top_k is None else top_k,
        top_p=gen.top_p if top_p is None else top_p,
        seed=seed).resolved()
    return max_new_tokens, stops, params


def start_session(model, max_context: int, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, emit):
    """Check the arguments and tokenize (``prompt``: text or a list of chat messages); the
    :class:`Session`, the ids, the resolved :class:`SamplingParams` and the timings so far."""
    max_new_tokens, stops, params = check_generation(model, max_new_tokens, temperature, top_k, top_p, stop, seed)
    if isinstance(prompt, Pruned):
        raise NexusRTError("KV pruning runs only in the serving engine; the one-sequence runners (CPU and CUDA) "
                           "cannot prune, so a pruning request must not reach them")
    report = None
    if isinstance(prompt, Rendered):  # an nrt.Context, already checked against its budgets
        report = {"layer_tokens": dict(prompt.layer_tokens),
                  "truncated": {k: {"tokens": n, "budget": b} for k, (n, b) in prompt.truncated.items()}}
        prompt = prompt.prompt
    t0 = time.perf_counter()
    if isinstance(prompt, TokenIds):
        ids = _checked_ids(prompt, model.config.vocab_size)
    else:
        chat = isinstance(prompt, list)
        text = model.tokenizer.apply_chat_template(prompt) if chat else prompt
        if len(text) > EXACT_COUNT_CHARS:  # refused from its length alone: tokenizing 50 MB takes a minute and GBs
            at_least = model.tokenizer.min_tokens(text)
            if at_least > max_context:
                raise PromptTooLong(at_least, max_context, model.config.source, at_least=True)
        ids = model.tokenizer.encode(text, add_special_tokens=not chat)  # a rendered chat holds its specials
    tokenize_s = time.perf_counter() - t0
    if not ids:
        raise InvalidArgument("prompt", "the prompt encodes to no tokens (empty prompt and no BOS token)")
    if len(ids) > max_context:
        raise PromptTooLong(len(ids), max_context, model.config.source)
    session = Session(model.tokenizer, model.eos_token_ids, stops, len(ids), emit, max_new_tokens)
    session.context = report
    return session, ids, params, {"tokenize_s": tokenize_s}
