"""One generation as seen by the host: ids in, text pieces out, stop rules, timings.

A :class:`Session` consumes the ids a runner produces (``on_token``) and decides when
to stop: an EOS id (kept in ``token_ids``, not in the text), a stop string (the text is
cut before it; ``token_ids`` end with the id that completed it), or the length limit.
Text that could still turn out to be the start of a stop string is held back, so a
streamed stop string never reaches the user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..models.tokenizer import BaseTokenizer, IncrementalDecoder


@dataclass
class GenerationResult:
    """What ``LLM.generate`` returns for one prompt.

    ``token_ids`` are the generated ids only; ``ttft_s`` runs from the start of prefill
    to the first id; ``tokens_per_s`` is the decode rate after the first id (0 with
    fewer than two ids). ``finish_reason``: ``eos``, ``stop``, ``length`` or ``context``.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_s: float
    tokens_per_s: float
    finish_reason: str = "length"
    seed: int | None = None
    timings: dict = field(default_factory=dict)
    context: dict | None = None  # an nrt.Context prompt: ids per layer and the layers cut to budget
    kv: dict | None = None  # the KV cache's report (engine/kv.py: policy, tokens kept / evicted, blocks)

    def to_dict(self) -> dict:
        extra = {k: v for k, v in (("context", self.context), ("kv", self.kv)) if v is not None}
        return {**extra, "text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "ttft_s": self.ttft_s, "tokens_per_s": self.tokens_per_s,
                "finish_reason": self.finish_reason, "seed": self.seed, "timings": self.timings}


class StopText:
    """Incremental text with stop strings: ``push`` returns text that is safe to show."""

    def __init__(self, tokenizer: BaseTokenizer, stop: list[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded but held back: may begin a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._release(self.pending + self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.pending + self.decoder.flush(), final=True)

    def _release(self, buf: str, final: bool) -> str:
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[:min(hits)]
        hold = 0 if final else self._held(buf)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def _held(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


class Session:
    """Tracks one prompt's generation; ``on_token`` is the runner callback (True = stop)."""

    def __init__(self, tokenizer: BaseTokenizer, eos_ids, stop: list[str], prompt_tokens: int,
                 emit: Callable[[str], None], max_new_tokens: int):
        self.text = StopText(tokenizer, stop)
        self.eos_ids = set(eos_ids)
        self.emit = emit
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason = "length"
        self.t_start = time.perf_counter()
        self.t_first = self.t_last = None
        self.context: dict | None = None  # set by start_session for an nrt.Context prompt

    def fresh(self, emit: Callable[[str], None]) -> "Session":
        """A session for another generation from the same prompt (another of a request's ``n``
        choices): the same stop rules, limits and context report; its own text, ids and clock."""
        other = Session(self.text.decoder.tokenizer, self.eos_ids, self.text.stop, self.prompt_tokens, emit,
                        self.max_new_tokens)
        other.context = self.context
        return other

    def on_token(self, token_id: int) -> bool:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return True
        self._out(self.text.push(token_id))
        if self.text.stopped:
            self.finish_reason = "stop"
            return True
        return False

    def _out(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.emit(piece)

    def finish(self, max_context_hit: bool, seed: int | None, extra_timings: dict) -> GenerationResult:
        self._out(self.text.finish())
        if self.finish_reason == "length" and max_context_hit and len(self.token_ids) < self.max_new_tokens:
            self.finish_reason = "context"
        end = time.perf_counter()
        n = len(self.token_ids)
        ttft = (self.t_first or end) - self.t_start
        decode_s = (self.t_last - self.t_first) if n > 1 else 0.0
        timings = {**extra_timings, "prefill_s": ttft, "decode_s": decode_s, "total_s": end - self.t_start,
                   "e2e_tokens_per_s": n / (end - self.t_start) if end > self.t_start else 0.0}
        return GenerationResult(
            text="".join(self.pieces), token_ids=self.token_ids, prompt_tokens=self.prompt_tokens,
            ttft_s=ttft, tokens_per_s=(n - 1) / decode_s if decode_s > 0 else 0.0,
            finish_reason=self.finish_reason, seed=seed, timings=timings, context=self.context)
