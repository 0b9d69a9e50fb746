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
reported in :attr:`Rendered.truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgument

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

    ``budgets`` overrides the per-layer token budgets (``{"reference": 2048}``); an unknown
    layer name, a negative or non-integer budget, or an ``on_overflow`` other than
    ``"error"``/``"truncate"`` is a ValueError when the context is made.
    """

    system: str = ""
    persona: str = ""
    instructions: str = ""
    reference: str = ""
    working: str = ""
    budgets: dict = field(default_factory=dict)
    on_overflow: str = "error"

    def __post_init__(self):
        for name in LAYERS:
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"context layer {name!r} must be a string, got {type(getattr(self, name)).__name__}")
            check_text(getattr(self, name), f"context layer {name!r}")
        if not isinstance(self.budgets, dict):
            raise TypeError(f"budgets must be a dict of layer -> tokens, got {type(self.budgets).__name__}")
        for name, b in self.budgets.items():
            if name not in LAYERS:
                raise ValueError(f"unknown context layer {name!r} in budgets (layers: {', '.join(LAYERS)})")
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"the budget of layer {name!r} must be an integer >= 0, got {b!r}")
        if self.on_overflow not in OVERFLOW:
            raise ValueError(f"on_overflow must be one of {', '.join(OVERFLOW)}, got {self.on_overflow!r}")
        if not any(getattr(self, name) for name in LAYERS):
            raise ValueError("a context needs at least one non-empty layer")

    @classmethod
    def from_dict(cls, d: dict) -> "Context":
        """A context from a JSON object (the server's ``nexusrt_context``); unknown keys are errors."""
        if not isinstance(d, dict):
            raise TypeError(f"a context must be an object, got {type(d).__name__}")
        allowed = set(LAYERS) | {"budgets", "on_overflow"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ValueError(f"unknown context field {extra[0]!r} (layers: {', '.join(LAYERS)}; "
                             "also budgets, on_overflow)")
        return cls(**d)

    def budget(self, layer: str) -> int:
        return self.budgets.get(layer, DEFAULT_BUDGETS[layer])


@dataclass(frozen=True)
class Rendered:
    """A context as a prompt: ``prompt`` (text, or chat messages), the ids each layer kept
    (``layer_tokens``) and ``truncated`` (``{layer: (tokens, budget)}`` of each cut layer)."""

    prompt: str | list[dict]
    layer_tokens: dict
    truncated: dict
    context: Context | None = None


def render(ctx: Context, tokenizer) -> Rendered:
    """Check every layer against its budget (or cut it), then build the prompt in layer order."""
    texts, sizes, cut = {}, {}, {}
    for name in LAYERS:
        text = getattr(ctx, name)
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        budget = ctx.budget(name)
        if len(ids) > budget:
            if ctx.on_overflow == "error":
                raise InvalidArgument("prompt", f"context layer {name!r} is {len(ids)} tokens, over its budget of "
                                                f"{budget} (raise budgets[...] or pass on_overflow='truncate')")
            cut[name] = (len(ids), budget)
            ids = ids[:budget]
            text = tokenizer.decode(ids, skip_special_tokens=False)
        texts[name], sizes[name] = text, len(ids)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": texts[n]} for n in ("system", "persona") if n in texts]
        user = "\n\n".join(texts[n] for n in ("instructions", "reference", "working") if n in texts)
        if user:
            messages.append({"role": "user", "content": user})
        prompt: str | list[dict] = messages
    else:
        prompt = "\n\n".join(texts[n] for n in LAYERS if n in texts)
    return Rendered(prompt, sizes, cut, ctx)
