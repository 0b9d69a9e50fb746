"""The chat-template sandbox's bound on what comparisons, hashes and sorts walk, and on what a
render builds in all (nexusrt/models/template_walks.py, template_sizes.BUILT_FACTOR).

A list built as ``[x, x]`` forty times over is forty objects and 2**41 items to compare: Python's
==, hash and sort follow every reference in C code that neither the sandbox's trace function nor
Ctrl-C interrupts, so before the bound each case below hung its process for ever. They run in a
capped child with a time limit (helpers_bounded), so a regression fails here instead of hanging."""

from __future__ import annotations

import pytest

from helpers_bounded import check_refused, render_templates_bounded

from nexusrt.errors import ModelError
from nexusrt.models.chat import render_chat
from nexusrt.models.template_sizes import BUILT_FACTOR, Limits
from nexusrt.models.template_walks import walk_size

# a.x, b.y: nested lists, a.t: nested tuples, each holding its previous self twice, forty times over.
DAG = ("{% set a = namespace(x=[[]], t=()) %}{% for i in range(40) %}{% set a.x = [a.x, a.x] %}"
       "{% set a.t = (a.t, a.t) %}{% endfor %}{% set b = namespace(y=[[]]) %}"
       "{% for i in range(40) %}{% set b.y = [b.y, b.y] %}{% endfor %}")
WALK = "would walk more than 4194304 items"
HOSTILE = {
    "eq": (DAG + "{{ a.x == b.y }}", "a comparison " + WALK),
    "ne": (DAG + "{{ a.x != b.y }}", "a comparison " + WALK),
    "lt": (DAG + "{{ a.x < b.y }}", "a comparison " + WALK),
    "in": (DAG + "{{ a.x in [b.y] }}", "a comparison " + WALK),
    "not-in": (DAG + "{{ a.x not in [b.y] }}", "a comparison " + WALK),
    "chained": (DAG + "{{ [] <= a.x <= b.y }}", "a comparison " + WALK),
    "dict-key": (DAG + "{{ {a.t: 1} | length }}", "a dict key " + WALK),
    "get": (DAG + "{{ {1: 2}.get(a.t) }}", "call of 'get' " + WALK),
    "index": (DAG + "{{ [b.y, a.x].index(a.x) }}", "call of 'index' " + WALK),
    "count": (DAG + "{{ [b.y].count(a.x) }}", "call of 'count' " + WALK),
    "loop-changed": (DAG + "{% for i in range(2) %}{{ loop.changed(a.x if i else b.y) }}{% endfor %}",
                     "call of 'changed' " + WALK),
    "dict-global": (DAG + "{{ dict([(a.t, 1)]) | length }}", "call of 'dict' " + WALK),
    "test-eq": (DAG + "{{ a.x is eq(b.y) }}", "test 'eq' " + WALK),
    "test-in": (DAG + "{{ a.x is in([b.y]) }}", "test 'in' " + WALK),
    "select": (DAG + "{{ [a.x] | select('equalto', b.y) | list | length }}", "test 'equalto' " + WALK),
    "sort": (DAG + "{{ [a.x, b.y] | sort | length }}", "filter 'sort' " + WALK),
    "unique": (DAG + "{{ [a.t, a.t] | unique | list | length }}", "filter 'unique' " + WALK),
    "max": (DAG + "{{ [a.x, b.y] | max | length }}", "filter 'max' " + WALK),
    "min": (DAG + "{{ [a.x, b.y] | min | length }}", "filter 'min' " + WALK),
    "dictsort": (DAG + "{{ {1: a.x, 2: b.y} | dictsort(by='value') | length }}", "filter 'dictsort' " + WALK),
    "groupby": (DAG + "{{ [{'k': a.x}, {'k': b.y}] | groupby('k') | list | length }}", "filter 'groupby' " + WALK),
    # Few items, but each pair of equal 4 M-character strings is compared in full: 400 GB of memcmp.
    "equal-strings": ("{% set s = 'x' * 4000000 %}{% set t = 'x' * 3999999 ~ 'x' %}{{ [s] * 100000 == [t] * 100000 }}",
                      "a comparison " + WALK),
    "long-literal-in": ("{% set l = ['x' * 99 ~ 'y'] * 100000 %}{{ '" + "x" * 100 + "' in l }}",
                        "a comparison " + WALK),
    "too-deep": ("{% set a = namespace(x=[]) %}{% for i in range(3000) %}{% set a.x = [a.x] %}{% endfor %}"
                 "{{ a.x == b }}", "a comparison was given a value nested too deeply to compare"),
    # Each value within the limit, but a new 1 M-character string kept per iteration: 2 GB within
    # the 2 s time limit before the total was bounded.
    "accumulate": ("{% set ns = namespace(a=[]) %}{% for i in range(100000) %}"
                   "{% set ns.a = ns.a + ['x' * 1000000 ~ i] %}{% endfor %}{{ ns.a | length }}",
                   r"characters and list items in all, over the 67108864 limit \(16 times"),
}


@pytest.fixture(scope="module")
def hostile_results():
    return render_templates_bounded({k: t for k, (t, _) in HOSTILE.items()}, timeout=120)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_walk_past_the_limit_is_refused_before_it_runs(hostile_results, name):
    # accumulate keeps up to its 64 M characters built in all; the others keep almost nothing.
    check_refused(hostile_results, name, HOSTILE[name][1], max_peak_mib=160 if name == "accumulate" else 64)


def test_the_hostile_walks_run_in_bounded_memory(hostile_results):
    results, rc, err, rss = hostile_results
    assert rc == 0, err[-2000:]
    assert len(results) == len(HOSTILE)
    assert rss < 1024, f"peak RSS {rss:.0f} MiB"


def test_ordinary_comparisons_hashes_and_sorts_still_render():
    template = ("{% set s = [1, 2] %}{{ [s, s] == [s, s] }} {{ [1, [2, 3]] == [1, [2, 3]] }} {{ (1, 2) in [(1, 2)] }} "
                "{{ {(1, 2): 'v'}[(1, 2)] }} {{ [3, 1, 2] | sort | join(',') }} {{ [1, 1, 2] | unique | list | length }} "
                "{{ 2 is eq(2) }} {{ [1, 2] | max }} {{ {'b': 1, 'a': 2} | dictsort | first | first }} "
                "{{ [1, 2, 3].index(2) }} {{ {'k': 1}.get('k') }} {{ messages[0].role == 'user' }} "
                "{{ 'user' in messages[0] | list }} {{ 1 < 2 < 3 }}")
    got = render_chat(template, [{"role": "user", "content": "hi"}])
    assert got == "True True True v 1,2,3 2 True 2 a 1 1 True False True"


@pytest.mark.parametrize("items, refused", [(98, False), (99, False), (100, True)])
def test_the_walk_limit_is_the_limit_on_one_value(items, refused):
    # A list of n numbers walks n + 1 items; with a 100-item limit, 99 numbers pass and 100 do not.
    template = "{% set l = range(" + str(items) + ") | list %}{{ l == l }}"
    limits = Limits(max_chars=100)
    if refused:
        with pytest.raises(ModelError, match="a comparison would walk more than 100 items"):
            render_chat(template, [{"role": "user", "content": "hi"}], limits=limits)
    else:
        assert render_chat(template, [{"role": "user", "content": "hi"}], limits=limits) == "True"


def test_walk_size_counts_every_reference_and_works_each_object_out_once():
    x = [1, 2, "three"]
    assert walk_size(x, 10**6, {}) == 1 + 1 + 1 + 5  # the list, two numbers, five characters
    assert walk_size([x, x], 10**6, {}) == 1 + 8 + 8
    assert walk_size({"a": x, "b": (x,)}, 10**6, {}) == 1 + (1 + 8) + (1 + (1 + 8))  # the dict, keys, values
    v = []
    for _ in range(200):  # 2**201 items as a walk; seen makes it 200 steps, the budget stops it early
        v = [v, v]
    assert walk_size(v, 1000, {}) > 1000
    assert walk_size("a string is its characters", 0, {}) == 26
    assert walk_size(["", "ab", b"abc"], 10**6, {}) == 1 + 1 + 2 + 3


def test_what_a_render_builds_in_all_is_bounded_and_ordinary_building_passes():
    build = "{% set ns = namespace(s='') %}{% for i in range(N) %}{% set ns.s = 'x' * 900 ~ i %}{% endfor %}{{ 1 }}"
    limits = Limits(max_chars=1000)  # 16,000 characters built in all
    assert render_chat(build.replace("N", "5"), [{"role": "user", "content": "hi"}], limits=limits) == "1"
    with pytest.raises(ModelError, match=f"in all, over the {BUILT_FACTOR * 1000} limit"):
        render_chat(build.replace("N", "40"), [{"role": "user", "content": "hi"}], limits=limits)
