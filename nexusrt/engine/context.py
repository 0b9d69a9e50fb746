"""``nrt.Context``: the announcement's layered context (ICM), checked against per-layer budgets.

Five layers, always rendered in this order, each with a token budget (the announcement's
defaults, overridable per context):

==============  ======  =====================================================
layer           budget  rendered (model with a chat template / without one)
==============  ======  =====================================================
``system``        256   system message 1      / text, then a blank line
``persona``       512   system message 2      / text, then a blank line
``instructions``  1024  user message, part 1  / text, then a blank line
``reference``     8192  user message, part 2  / text, then a blank line
``working``       4096  user message, part 3  / text
==============  ======  =====================================================

With a chat template the system and persona layers are the leading system message(s) and
the rest is one user message whose parts are joined by blank lines; without one the
non-empty layers are joined by blank lines. Either way the system and persona layers come
first and render the same whatever follows, so two requests that share them share their
leading KV blocks through the serving engine's prefix cache.

A layer's size is the ids its text encodes to alone (no BOS). A layer over its budget is a
ValueError naming the layer and both counts, or with ``on_overflow="truncate"`` is cut to
its budget (its *first* ids are kept: a layer's opening states its purpose) and the cut is
reported in :attr:`Rendered.truncated`. The cut backs off to a whole character: the kept
text never holds a U+FFFD its source did not (an id that ends mid-character is dropped) and
re-encodes alone within the budget. A layer cut to nothing is left out of the prompt like an
empty one; a context with nothing left is refused (a context needs at least one non-empty
layer), as is one whose every non-empty layer has a budget of 0, when it is made.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from ..errors import InvalidArgument, InvalidArgumentType

LAYERS = ("system", "persona", "instructions", "reference", "working")
DEFAULT_BUDGETS = {"system": 256, "persona": 512, "instructions": 1024, "reference": 8192, "working": 4096}
OVERFLOW = ("error", "truncate")


def check_text(text: str, what: str, argument: str = "prompt") -> None:
    """Text from outside (argv, a file, JSON with escapes) may carry lone surrogates, which no
    tokenizer can take: an :class:`~nexusrt.errors.InvalidArgument` of ``argument`` naming
    ``what`` and where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(argument, f"{what} is not valid UTF-8 text "
                                        f"(position {exc.start}: {text[exc.start:exc.end]!r})") from None


@dataclass(frozen=True)
class Context:
    """A prompt built of the five ICM layers (empty layers are left out).

    ``budgets`` overrides the per-layer token budgets (``{"reference": 2048}``); it is copied
    when the context is made, into a read-only mapping (a later change to the dict passed in
    changes nothing). An unknown layer name, a negative or non-integer budget, an
    ``on_overflow`` other than ``"error"``/``"truncate"``, no non-empty layer, or no non-empty
    layer with a budget above 0 is an :class:`~nexusrt.errors.InvalidArgument` (a ValueError)
    naming the argument when the context is made; a layer or ``budgets`` of the wrong type is
    an :class:`~nexusrt.errors.InvalidArgumentType` (a TypeError).
    """

    system: str = ""
    persona: str = ""
    instructions: str = ""
    reference: str = ""
    working: str = ""
    budgets: Mapping = field(default_factory=dict)
    on_overflow: str = "error"

    def __post_init__(self):
        for name in LAYERS:
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentType(name, f"context layer {name!r} must be a string, "
                                                f"got {type(getattr(self, name)).__name__}")
            check_text(getattr(self, name), f"context layer {name!r}", name)
        if not isinstance(self.budgets, Mapping):
            raise InvalidArgumentType("budgets", "budgets must be a dict of layer -> tokens, "
                                                 f"got {type(self.budgets).__name__}")
        budgets = {}
        for name, b in self.budgets.items():
            if name not in LAYERS:
                raise InvalidArgument("budgets", f"unknown context layer {name!r} in budgets "
                                                 f"(layers: {', '.join(LAYERS)})")
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
                raise InvalidArgument("budgets", f"the budget of layer {name!r} must be an integer >= 0, got {b!r}")
            budgets[name] = int(b)
        # A copy, read-only: the budgets checked here are the ones render() applies.
        object.__setattr__(self, "budgets", MappingProxyType(budgets))
        if not isinstance(self.on_overflow, str) or self.on_overflow not in OVERFLOW:
            raise InvalidArgument("on_overflow", f"on_overflow must be one of {', '.join(OVERFLOW)}, "
                                                 f"got {self.on_overflow!r}")
        given = [name for name in LAYERS if getattr(self, name)]
        if not given:
            raise InvalidArgument("prompt", "a context needs at least one non-empty layer")
        if all(self.budget(name) == 0 for name in given):  # every one would be refused or cut to nothing
            raise InvalidArgument("budgets", "a context needs at least one non-empty layer, and every non-empty "
                                             f"layer ({', '.join(given)}) has a budget of 0")

    def __reduce__(self):  # pickle and copy: a mappingproxy does neither, so the budgets go as a dict
        return (type(self), tuple(getattr(self, name) for name in LAYERS) + (dict(self.budgets), self.on_overflow))

    @classmethod
    def from_dict(cls, d: dict) -> "Context":
        """A context from a JSON object (the server's ``nexusrt_context``); unknown keys are errors."""
        if not isinstance(d, dict):
            raise InvalidArgumentType("prompt", f"a context must be an object, got {type(d).__name__}")
        allowed = set(LAYERS) | {"budgets", "on_overflow"}
        extra = sorted(set(d) - allowed, key=str)
        if extra:
            raise InvalidArgument(str(extra[0]), f"unknown context field {extra[0]!r} (layers: {', '.join(LAYERS)}; "
                                                 "also budgets, on_overflow)")
        return cls(**d)

    def budget(self, layer: str) -> int:
        return self.budgets.get(layer, DEFAULT_BUDGETS[layer])


@dataclass(frozen=True)
class Rendered:
    """A context as a prompt: ``prompt`` (text, or chat messages), the ids each layer kept
    (``layer_tokens``: the kept text encoded alone; 0 for a layer cut to nothing), ``truncated``
    (``{layer: (tokens, budget)}`` of each cut layer) and ``context``, the context as rendered
    (a layer cut to nothing is empty in it, as it is left out of the prompt)."""

    prompt: str | list[dict]
    layer_tokens: dict
    truncated: dict
    context: Context | None = None


REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not a whole UTF-8 character
BACK_OFF_STEPS = 8  # ids a truncation drops one at a time (a UTF-8 character is at most 4 bytes)


def _foreign_replacement(text: str, source: str) -> bool:
    """Whether ``text`` (decoded from the first ids of ``source``) holds a U+FFFD that is not
    ``source``'s own: the bytes of a character cut in two. Those come last in the text."""
    if REPLACEMENT not in text or source.startswith(text):
        return False
    return text.endswith(REPLACEMENT) or text.count(REPLACEMENT) > source.count(REPLACEMENT)


def _truncate(tokenizer, source: str, ids: list[int], budget: int) -> tuple[str, int]:
    """The text of ``source``'s first ``budget`` ids, backed off to a whole character and to a
    text that encodes alone within ``budget`` ids: ``(text, its ids)``, ``("", 0)`` when
    nothing is left.

    It drops one id at a time (a character is a few ids: the longest text that fits is kept),
    then, for a tokenizer whose decoded prefixes keep failing, twice as many each time, so a
    layer of thousands of ids is never decoded thousands of times."""
    k, tries = min(budget, len(ids)), 0
    while k > 0:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        # A last id that ends mid-character decodes to U+FFFD; and a cut inside the source's own
        # U+FFFD looks like it but re-encodes to more ids than were kept.
        if not _foreign_replacement(text, source):
            n = len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
            if n <= budget:
                return text, n
        tries += 1
        k -= 1 if tries <= BACK_OFF_STEPS else 1 << (tries - BACK_OFF_STEPS)
    return "", 0


def render(ctx: Context, tokenizer) -> Rendered:
    """Check every layer against its budget (or cut it), then build the prompt in layer order."""
    texts, sizes, cut = {}, {}, {}
    for name in LAYERS:
        text = getattr(ctx, name)
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        budget = ctx.budget(name)
        size = len(ids)
        if size > budget:
            if ctx.on_overflow == "error":
                raise InvalidArgument("prompt", f"context layer {name!r} is {size} tokens, over its budget of "
                                                f"{budget} (raise budgets[...] or pass on_overflow='truncate')")
            cut[name] = (size, budget)
            text, size = _truncate(tokenizer, text, ids, budget)
        sizes[name] = size
        if text:  # a layer cut to nothing is left out, as an empty one is
            texts[name] = text
    if not texts:
        cuts = ", ".join(f"{name!r} ({n} tokens, budget {b})" for name, (n, b) in cut.items())
        raise InvalidArgument("prompt", f"every layer of the context was truncated to nothing ({cuts}), and a "
                                        "context needs at least one non-empty layer (raise budgets[...])")
    dropped = {name: "" for name in cut if name not in texts}
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": texts[n]} for n in ("system", "persona") if n in texts]
        user = "\n\n".join(texts[n] for n in ("instructions", "reference", "working") if n in texts)
        if user:
            messages.append({"role": "user", "content": user})
        prompt: str | list[dict] = messages
    else:
        prompt = "\n\n".join(texts[n] for n in LAYERS if n in texts)
    return Rendered(prompt, sizes, cut, replace(ctx, **dropped) if dropped else ctx)
