"""``nrt.Context``: layers rendered in order, budgets enforced or truncated (and reported), bad
contexts refused before any work, and shared system/persona layers hitting the prefix cache."""

from __future__ import annotations

import copy
import pickle
import random
from types import MappingProxyType

import pytest

import nexusrt as nrt
from conftest import engine_is_empty
from nexusrt.engine.context import DEFAULT_BUDGETS, LAYERS, Context, render
from nexusrt.errors import InvalidArgument, InvalidArgumentType
from nexusrt.models.loader import locate
from nexusrt.models.tokenizer import ByteTokenizer, HFTokenizer

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


@pytest.mark.parametrize("kw, argument, match", [
    (dict(working="x", budgets={"scratch": 10}), "budgets", "unknown context layer 'scratch'"),
    (dict(working="x", budgets={"working": -1}), "budgets", "'working' must be an integer >= 0"),
    (dict(working="x", on_overflow="drop"), "on_overflow", "on_overflow must be one of"),
    (dict(), "prompt", "at least one non-empty layer"),
    (dict(working="a\ud800b"), "working", r"context layer 'working' is not valid UTF-8 text \(position 1"),
    # Every non-empty layer budgeted to nothing: the rule above, known before any tokenizer runs.
    (dict(working="def main():", budgets={"working": 0}, on_overflow="truncate"), "budgets",
     r"at least one non-empty layer, and every non-empty layer \(working\) has a budget of 0"),
    (dict(system="s", working="w", budgets={"system": 0, "working": 0}), "budgets", r"\(system, working\)"),
])
def test_bad_contexts_are_refused_when_made(kw, argument, match):
    with pytest.raises(InvalidArgument, match=match) as e:  # a ValueError
        Context(**kw)
    assert e.value.argument == argument


def test_the_budgets_are_copied_when_the_context_is_made():
    budgets = {"working": 2}
    ctx = Context(working="a b c d", budgets=budgets, on_overflow="truncate")
    budgets["working"] = -5  # after the check: must change nothing (it kept ids[:-5])
    budgets["scratch"] = 1
    assert ctx.budget("working") == 2 and dict(ctx.budgets) == {"working": 2}
    assert render(ctx, PlainTok()).truncated == {"working": (4, 2)}
    with pytest.raises(TypeError):
        ctx.budgets["working"] = -5  # read-only
    made = Context.from_dict({"working": "x", "budgets": {"working": 3}})
    assert made == Context(working="x", budgets={"working": 3}) and isinstance(made.budgets, MappingProxyType)
    assert pickle.loads(pickle.dumps(ctx)) == ctx == copy.deepcopy(ctx)  # as a dict of budgets did
    with pytest.raises(InvalidArgumentType, match="budgets must be a dict") as e:  # a TypeError
        Context(working="x", budgets=[("working", 3)])
    assert e.value.argument == "budgets"


def test_from_dict_refuses_unknown_fields():
    assert Context.from_dict({"working": "x", "budgets": {"working": 8}}).budget("working") == 8
    with pytest.raises(ValueError, match="unknown context field 'memo'"):
        Context.from_dict({"working": "x", "memo": "y"})
    with pytest.raises(TypeError, match="must be a string"):
        Context(working=3)


POOL = ["a", "Z", " ", "\n", "é", "ß", "€", "中", "😀", "🧪", "e\u0301", "\ufffd", "def", " the", "👩\u200d💻", "\x00"]


def _random_text(rng: random.Random) -> str:
    """Unicode of every UTF-8 length (1 to 4 bytes), combining marks, joiners and a real U+FFFD."""
    def one():
        if rng.random() < 0.7:
            return rng.choice(POOL)
        return chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                               rng.randrange(0xE000, 0x110000)]))
    return "".join(one() for _ in range(rng.randrange(1, 24)))


@pytest.mark.parametrize("tok", ["bytes", "stdlib-tiny"])
def test_a_truncated_layer_is_whole_characters_within_its_budget(tok):
    """Property over random text and budgets: the kept text is the start of the layer (its first
    ids, never a U+FFFD of a character cut in two), re-encodes within the budget as reported,
    is as long as whole characters allow (byte tokenizer), and a layer cut to nothing is left out."""
    tokenizer = ByteTokenizer() if tok == "bytes" else HFTokenizer(locate("nexusrt:stdlib-tiny")[0])
    rng, checked = random.Random(1234), 0
    for _ in range(300):
        source = _random_text(rng)
        ids = tokenizer.encode(source, add_special_tokens=False)
        for budget in {0, 1, 2, 3, len(ids) // 2, max(len(ids) - 1, 0), len(ids), rng.randrange(len(ids) + 2)}:
            ctx = Context(system="s", working=source, budgets={"working": budget}, on_overflow="truncate")
            r = render(ctx, tokenizer)
            kept = r.prompt[1]["content"] if len(r.prompt) > 1 else ""
            assert source.startswith(kept), (source, budget, kept)  # the first ids, no foreign U+FFFD
            assert kept.count("\ufffd") <= source.count("\ufffd")
            size = len(tokenizer.encode(kept, add_special_tokens=False)) if kept else 0
            assert size <= budget and r.layer_tokens["working"] == size, (source, budget, kept)
            if len(ids) <= budget:
                assert kept == source and r.truncated == {}
                continue
            assert r.truncated == {"working": (len(ids), budget)}
            if tok == "bytes":  # backed off by less than one character (at most 4 bytes)
                assert budget - size < 4 and ids[:size] == tokenizer.encode(kept, add_special_tokens=False)
            if not kept:  # cut to nothing: left out, as an empty layer is
                assert r.prompt == [{"role": "system", "content": "s"}] and r.context.working == ""
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("source, budget, kept", [("é€😀 def", 1, ""), ("é€😀 def", 4, "é"), ("😀😀😀😀", 3, ""),
                                                  ("😀😀😀😀", 9, "😀😀"), ("a\ufffd😀", 5, "a\ufffd")])
def test_the_hunts_cuts_back_off_to_a_character(source, budget, kept):
    tok = ByteTokenizer()
    r = render(Context(persona="p", working=source, budgets={"working": budget}, on_overflow="truncate"), tok)
    assert r.prompt[1:] == ([{"role": "user", "content": kept}] if kept else [])
    assert r.layer_tokens["working"] == len(kept.encode("utf-8")) <= budget


def test_layers_cut_to_nothing_are_left_out_or_the_context_refused():
    tok = ByteTokenizer()
    r = render(Context(system="You are terse.", working="w", budgets={"system": 0}, on_overflow="truncate"), tok)
    assert r.prompt == [{"role": "user", "content": "w"}]  # no empty system message
    assert r.layer_tokens == {"system": 0, "working": 1} and r.truncated == {"system": (14, 0)}
    plain = render(Context(system="a b", persona="c", working="d", budgets={"persona": 0}, on_overflow="truncate"),
                   PlainTok())
    assert plain.prompt == "a b\n\nd" and plain.context.persona == ""  # no blank part for it either
    with pytest.raises(InvalidArgument, match=r"every layer of the context was truncated to nothing "
                                              r"\('working' \(4 tokens, budget 3\)\)") as e:
        render(Context(working="😀", budgets={"working": 3}, on_overflow="truncate"), tok)  # no whole character
    assert e.value.argument == "prompt"


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


def test_a_layer_cut_to_nothing_is_not_sent(tiny_llm):
    """``budgets={"system": 0}`` used to send an empty system message; a context cut to nothing
    generated from an empty conversation. Refused calls leave the LLM as it was."""
    ref = tiny_llm.generate(Context(working="def main():"), max_new_tokens=6, temperature=0)
    ctx = Context(system=SYSTEM, working="def main():", budgets={"system": 0}, on_overflow="truncate")
    r = tiny_llm.generate(ctx, max_new_tokens=6, temperature=0)
    assert r.token_ids == ref.token_ids and r.prompt_tokens == ref.prompt_tokens
    assert r.context["layer_tokens"]["system"] == 0 and r.context["truncated"]["system"]["budget"] == 0
    pruned = tiny_llm.generate(ctx, max_new_tokens=6, temperature=0, kv_policy="h2o", kv_budget=64,
                               kv_protect=["system"])  # protects nothing: the layer is not in the prompt
    assert pruned.token_ids == ref.token_ids and pruned.kv["protected_tokens"] == 0
    gone = Context(working="😀", budgets={"working": 3}, on_overflow="truncate")
    for call in (tiny_llm.generate, tiny_llm.submit, tiny_llm.stream):
        with pytest.raises(InvalidArgument, match="truncated to nothing"):
            call(gone)
    assert tiny_llm.generate(Context(working="def main():"), max_new_tokens=6, temperature=0).token_ids == ref.token_ids
    assert engine_is_empty(tiny_llm)
