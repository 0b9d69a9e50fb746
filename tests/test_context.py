"""``nrt.Context``: layers rendered in order, budgets enforced or truncated (and reported), bad
contexts refused before any work, and shared system/persona layers hitting the prefix cache."""

from __future__ import annotations

import pytest

import nexusrt as nrt
from conftest import engine_is_empty
from nexusrt.engine.context import DEFAULT_BUDGETS, LAYERS, Context, render

SYSTEM = "You are a careful assistant that answers questions about Python's standard library. " * 2
PERSONA = "You speak tersely and you quote function names exactly as they are spelled in the source. " * 2


class PlainTok:
    """A word tokenizer without a chat template (one id per space-separated word)."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return list(range(len(text.split())))

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class ChatTok(PlainTok):
    chat_template = "{{ messages }}"


def test_the_announcements_budgets_and_layer_order():
    assert LAYERS == ("system", "persona", "instructions", "reference", "working")
    assert DEFAULT_BUDGETS == {"system": 256, "persona": 512, "instructions": 1024, "reference": 8192,
                               "working": 4096}
    ctx = Context(working="w", system="s", reference="r", persona="p", instructions="i")
    assert render(ctx, PlainTok()).prompt == "s\n\np\n\ni\n\nr\n\nw"
    msgs = render(ctx, ChatTok()).prompt
    assert msgs == [{"role": "system", "content": "s"}, {"role": "system", "content": "p"},
                    {"role": "user", "content": "i\n\nr\n\nw"}]
    only = render(Context(system="s", working="w"), ChatTok())
    assert only.prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "w"}]
    assert only.layer_tokens == {"system": 1, "working": 1} and only.truncated == {}


def test_a_layer_over_budget_names_the_layer_and_both_counts():
    ctx = Context(system="a b c d e", working="x", budgets={"system": 3})
    with pytest.raises(ValueError, match=r"'system' is 5 tokens, over its budget of 3"):
        render(ctx, PlainTok())
    cut = render(Context(system="a b c d e", working="x", budgets={"system": 3}, on_overflow="truncate"),
                 PlainTok())
    assert cut.truncated == {"system": (5, 3)} and cut.layer_tokens["system"] == 3
    assert cut.prompt.startswith("w0 w1 w2\n\n")


@pytest.mark.parametrize("kw, match", [
    (dict(working="x", budgets={"scratch": 10}), "unknown context layer 'scratch'"),
    (dict(working="x", budgets={"working": -1}), "'working' must be an integer >= 0"),
    (dict(working="x", on_overflow="drop"), "on_overflow must be one of"),
    (dict(), "at least one non-empty layer"),
    (dict(working="a\ud800b"), r"context layer 'working' is not valid UTF-8 text \(position 1"),  # JSON's \ud800
])
def test_bad_contexts_are_refused_when_made(kw, match):
    with pytest.raises(ValueError, match=match):
        Context(**kw)


def test_from_dict_refuses_unknown_fields():
    assert Context.from_dict({"working": "x", "budgets": {"working": 8}}).budget("working") == 8
    with pytest.raises(ValueError, match="unknown context field 'memo'"):
        Context.from_dict({"working": "x", "memo": "y"})
    with pytest.raises(TypeError, match="must be a string"):
        Context(working=3)


def test_generate_with_a_context_equals_its_rendered_chat(tiny_llm):
    ctx = Context(system=SYSTEM, working="def main():")
    r = tiny_llm.generate(ctx, max_new_tokens=6, temperature=0)
    ref = tiny_llm.chat([{"role": "user", "content": "def main():"}], system=SYSTEM, max_new_tokens=6, temperature=0)
    assert r.token_ids == ref.token_ids and r.prompt_tokens == ref.prompt_tokens
    assert r.context["layer_tokens"]["working"] > 0 and r.context["truncated"] == {}
    assert r.to_dict()["context"] == r.context
    assert "".join(tiny_llm.stream(ctx, max_new_tokens=6, temperature=0)) == r.text
    with pytest.raises(ValueError, match="carries its own system layer"):
        tiny_llm.generate(ctx, system="again")
    with pytest.raises(ValueError, match=r"'working' is \d+ tokens, over its budget of 2"):
        tiny_llm.generate(Context(working="import os, sys, json", budgets={"working": 2}))
    cut = tiny_llm.generate(Context(working="import os, sys, json", budgets={"working": 2}, on_overflow="truncate"),
                        max_new_tokens=2, temperature=0)
    assert cut.context["truncated"]["working"]["budget"] == 2 and cut.context["layer_tokens"]["working"] == 2


def test_shared_system_and_persona_hit_the_prefix_cache(tiny_llm):
    a = Context(system=SYSTEM, persona=PERSONA, working="Which module parses JSON?")
    b = Context(system=SYSTEM, persona=PERSONA, working="How do I list a directory?")
    blocks = tiny_llm.engine.engine.blocks
    tiny_llm.generate([a], max_new_tokens=2, temperature=0)
    hits = blocks.hits
    tiny_llm.generate([b], max_new_tokens=2, temperature=0)
    shared = len(tiny_llm.tokenizer.encode_chat(render(a, tiny_llm.tokenizer).prompt[:2]))
    assert shared >= 32  # the two system messages span at least two full KV blocks
    assert blocks.hits - hits >= shared // 16 - 1  # all but maybe the block the user turn starts in
    assert engine_is_empty(tiny_llm)
