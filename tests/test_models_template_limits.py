"""The chat-template sandbox against templates that try to get past its limits (refused before
they allocate, fast, in bounded memory), and ordinary templates (rendered exactly as transformers
renders them: ``%``, ``~``, ``tojson``, ``join``, ``format``, ``{% generation %}``, special tokens)."""

from __future__ import annotations

import json

import pytest

from helpers_bounded import check_refused, render_templates_bounded

from nexusrt.errors import ModelError
from nexusrt.models.chat import render_chat

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": 'Hi <there> & "you" 🙂\nsecond line'},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to three."}]

BIG = "{% set s = 'x' * 4000000 %}{% set l = [s, s, s] %}"  # 3 references: 12 M characters as text
# (template, what the refusal says). Each builds far more than the 4 Mi-character limit if let through.
HOSTILE = {
    # 1. '%' formatting: widths written in the format or taken from the arguments, values as text.
    "percent-width": ('{{ "%0999999999d" % 1 }}', "'%' writes the width 0999999999"),
    "percent-star": ('{{ "%*d" % (1000000000, 1) }}', "'%' would build a value of about"),
    "percent-list": (BIG + '{{ "%s" % (l,) }}', "'%' would build a value of about"),
    "percent-tuple": (BIG + '{{ ("%s" * 3) % (s, s, s) }}', "'%' would build a value of about"),
    "percent-key": ("{{ '%(a)s' * 1000 % {'a': 'x' * 4000000} }}", "'%' would build a value of about"),
    "format-filter": (BIG + '{{ "%s" | format(l) }}', "filter 'format' would build"),
    # 2. values turned into text: sized as the text they would make, before it is made.
    "concat": (BIG + "{{ (l ~ '') | length }}", "string concatenation \\(~\\) over"),
    "repeat-refs": ("{% set l = ['x' * 4000000] * 4000000 %}{{ (l ~ '') | length }}", "concatenation \\(~\\) over"),
    "repeat-refs-300": ("{% set l = ['x' * 4000000] * 300 %}{{ (l ~ '') | length }}", "concatenation \\(~\\) over"),
    "repeat-refs-tojson": ("{% set l = ['x' * 4000000] * 300 %}{{ l | tojson | length }}",
                           "filter 'tojson' would build"),
    "output": (BIG + "{{ l }}", "output would build a value of about"),
    "string": (BIG + "{{ l | string | length }}", "filter 'string' would build"),
    "upper": (BIG + "{{ l | upper | length }}", "filter 'upper' would build"),
    "tojson": (BIG + "{{ l | tojson | length }}", "filter 'tojson' would build"),
    "tojson-nested": ("{% set s = ['x' * 4000000] %}{% set l = [s, s] %}{% set l = [l, l] %}{{ l | tojson }}",
                      "filter 'tojson' would build"),
    "tojson-indent": ("{{ [[[1]]] | tojson(indent=4000000) }}", "filter 'tojson' was given the indent 4000000"),
    "join-lists": (BIG + "{{ [l, l] | join | length }}", "filter 'join' would build"),
    "join-generator": ("{{ range(1000) | map('center', 4000000) | join | length }}", "filter 'join' would build"),
    "list-generator": ("{{ range(1000) | map('center', 4000000) | list | length }}", "filter 'list' would build"),
    "str-join-generator": ("{{ ''.join(range(1000) | map('center', 4000000)) | length }}",
                           "call of 'join' would build"),
    "pprint": (BIG + "{{ l | pprint | length }}", "filter 'pprint' would build"),
    "pprint-indent": ("{{ {'k' * 1000000: [1] * 1000} | pprint | length }}", "filter 'pprint' over the"),
    "raise": (BIG + "{{ raise_exception(l) }}", "raise_exception would build"),
    "block-set": ("{% set s = 'x' * 4000000 %}{% set b %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}"
                  "{{ b | length }}", "a block's output would build"),
    "macro": ("{% set s = 'x' * 4000000 %}{% macro m() %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}"
              "{{ m() | length }}", "a block's output would build"),
    # ... and what multiplies one argument by another.
    "indent-cr": ("{{ ('a\\r' * 1000) | indent(4000000) | length }}", "filter 'indent' would build"),
    "indent-str": ("{{ ('a\\n' * 1000) | indent('x' * 4000000) | length }}", "filter 'indent' would build"),
    "wordwrap": ("{{ ('a b ' * 1000) | wordwrap(1, wrapstring='x' * 4000000) | length }}",
                 "filter 'wordwrap' would build"),
    "replace-list": (BIG + "{{ ('a' * 1000) | replace('a', l) | length }}", "filter 'replace' would build"),
    "translate": ("{{ ('a' * 1000).translate({97: 'x' * 4000000}) | length }}", "call of 'translate' would build"),
    "sum-lists": ("{% set l = [0] * 100000 %}{{ [l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l]"
                  " | sum(start=[]) | length }}", "filter 'sum' would build"),
    # 3. integers: bounded before the arithmetic runs.
    "int-long-string": ("{% set x = ('f' * 4000000) | int(base=16) %}{% set y = x * x %}{% set z = y * y %}"
                        "{% set w = z * z %}{{ 'done' }}", "filter 'int' was given a string of 4000000 characters"),
    "int-product": ("{% set x = ('f' * 1000) | int(base=16) %}{% set y = x * x %}{% set z = y * y %}{{ 'done' }}",
                    "'\\*' would make an integer of about 8000 bits"),
    "int-literal": ("{{ 0x" + "f" * 2000 + " - 1 }}", "'-' was given an integer of 8000 bits"),
    "int-power": ("{{ 3 ** 100000 }}", "too large to compute"),
    "int-from-bytes": ("{{ (0).from_bytes(('x' * 100000).encode(), 'big') }}", "call of 'from_bytes' built an integer"),
    # 4. str.format widths nested in a field, taken from the arguments; repeated fields.
    "format-nested": ('{{ "{:>{}}".format("x", "1999999999") }}', "call of 'format' writes the width 1999999999"),
    "format-nested-spec": ("{{ '{0:{1}}'.format('x', '>1999999999') }}",
                           "call of 'format' writes the width 1999999999"),
    "format-map": ("{{ '{a:>{w}}'.format_map({'a': 'x', 'w': '1999999999'}) }}",
                   "call of 'format_map' writes the width 1999999999"),
    "format-repeat": ("{{ ('{0}' * 1000).format('x' * 4000000) }}", "call of 'format' would build"),
    "format-list": (BIG + "{{ '{}'.format(l) }}", "call of 'format' would build"),
    "format-repr": (BIG + "{{ '{!r}'.format(l) }}", "call of 'format' would build"),
}

@pytest.fixture(scope="module")
def hostile_results():
    return render_templates_bounded({k: t for k, (t, _) in HOSTILE.items()})


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused_early(hostile_results, name):
    # What is let through: 4 M characters, or 4 M references (32 MiB).
    check_refused(hostile_results, name, HOSTILE[name][1], max_peak_mib=64)


def test_hostile_templates_run_in_bounded_memory(hostile_results):
    results, rc, err, rss = hostile_results
    assert rc == 0, err[-2000:]
    assert len(results) == len(HOSTILE)
    assert rss < 1024, f"peak RSS {rss:.0f} MiB"


# Ordinary templates: what real chat templates do, rendered by us and by transformers.
QWEN_TOOLS = """\
{%- set tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather \\"now\\", é 🙂",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}, {"type": "function", "function": {"name": "noop", "parameters": {}}}] %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are helpful.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n" + (tools | map(attribute='function.name') | join(', ')) + "<|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA3_STYLE = """\
{{- bos_token }}
{%- set tools = [{"name": "search", "parameters": {"q": {"type": "string"}, "n": 3, "ok": true, "x": none}}] %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Tools:\\n" }}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

MISTRAL_STYLE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}
{%- endfor %}
"""

EVERYDAY_OPS = """\
{%- set ns = namespace(text='', n=0, items=[]) %}
{%- macro show(m) %}[{{ m.role | upper }}]{{ m.content | replace('\\n', ' / ') }}{% endmacro %}
{%- for m in messages %}
    {%- set ns.n = ns.n + m.content | length %}
    {%- set ns.text = ns.text ~ m.role ~ ':' ~ loop.index ~ ';' %}
    {%- set ns.items = ns.items + [m.role] %}
    {{- "%s/%d %s\\n" % (m.role, loop.index, m.content | wordcount) }}
    {{- "%03d|%-6s|%5.2f\\n" | format(loop.index, m.role, loop.index / 3) }}
    {{- "{:>4}|{:<10}|{!r}\\n".format(loop.index, m.role, m.role) }}
    {{- "{0}-{1:{2}}\\n".format(loop.index, m.role, 8) }}
    {{- show(m) ~ "\\n" }}
{%- endfor %}
{%- set block %}{% for r in ns.items | unique %}<{{ r }}>{% endfor %}{% endset %}
{{- block }}|{{ ns.text }}|{{ ns.n }}|{{ ns.items }}|{{ ns.items | join(',') }}
{{- messages | map(attribute='role') | list }}
{{- "|" ~ (messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' + ')) }}
{{- "|" ~ messages[0] ~ "|" ~ (messages | tojson) ~ "|" ~ (messages[:2] | string) }}
{{- "|" ~ (10 // 3) ~ (2 ** 10) ~ (7 % 3) ~ (10 - 3) ~ (1 / 4) ~ (2 ** 64 * 3 - 1) ~ ('ab' * 3) ~ ([1, 2] * 2) }}
{{- "|" ~ ("%(a)s=%(b)r" % {'a': 1, 'b': 'two'}) ~ ('0x' ~ ('%x' % 255)) ~ ('ff' | int(base=16)) ~ ('12' | int) }}
{{- "|" ~ ('a\\nb' | indent(2, first=True)) ~ ('one two three' | wordwrap(4)) ~ ('t' | center(5)) ~ ('x'.join('abc')) }}
{{- "|" ~ ([[1], [2, 3]] | sum(start=[])) ~ ({'b': 1, 'a': [1, 'x']} | pprint) ~ ('{"a": 1}' | length) }}
{{- "|" ~ ({'k': 'v'} | items | list) ~ (messages | length) ~ ('%s' % messages[1]) ~ ('{}'.format(messages[2])) }}
"""

CONVERSIONS = (  # autoescaped Markup, tojson's options, pprint, repr conversions, views and namespaces
    "{% autoescape true %}{{ '<b>' }}{{ messages[1].content }}{{ ('<{}>' | e).format('<x>') }}{{ ('%s|' | e) % '<y>' }}"
    "{{ ('x' | e).join(['<a>', '<b>']) }}{{ ('a<' | e).replace('a', '<z>') }}{% endautoescape %}"
    "{{ messages | tojson(ensure_ascii=True) }}"
    "{{ messages | tojson(indent='\t', sort_keys=True, separators=(',', ':')) }}"
    "{{ messages[1].content | pprint }}{{ messages | pprint }}"
    "{{ messages[0].items() | list }}{{ messages[0].keys() ~ '' }}"
    "{{ '%r %a %c %5.1f %-4d|' % (messages[1].content, messages[1].content, 65, 3.14159, 7) }}"
    "{{ '{!a:>30}{:08.3f}{:,}{:x}'.format('é', 2.5, 1234567, 255) }}"
    "{{ 'see www.x.com now' | urlize(target='_blank') }}"
    "{{ {'a': 1, 'b': 'x y'} | xmlattr }}{{ 'a\tb'.expandtabs(4) }}{{ messages[1].content | truncate(9) }}"
    "{% set ns = namespace(a=[1, 'b']) %}{{ ns }}{{ (range(5) | map('string') | list) ~ '' }}"
    "{{ [1, 2] | batch(1) | list }}"
)

GENERATION = """\
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}{% set inner = 'set inside' %}{{ message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{{- inner | default('scoped') }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def _transformers(template: str, messages, **tokens) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **tokens)
    return rendered[0]


@pytest.mark.parametrize("template", [QWEN_TOOLS, LLAMA3_STYLE, MISTRAL_STYLE, EVERYDAY_OPS, CONVERSIONS, GENERATION],
                         ids=["qwen-tools", "llama3-style", "mistral-style", "everyday-ops", "conversions",
                              "generation"])
def test_ordinary_templates_render_as_transformers_does(template):
    pytest.importorskip("transformers")
    messages = MESSAGES[1:] if template is MISTRAL_STYLE else MESSAGES
    ours = render_chat(template, messages, **TOKENS)
    assert ours == _transformers(template, messages, **TOKENS)


def test_large_ordinary_chat_renders_quickly():
    """Many long messages through tojson, join, ~ and %: the sizing adds no refusal and little time."""
    pytest.importorskip("transformers")
    import time

    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "word " * 2000}
                for i in range(200)]
    template = ("{% for m in messages %}{{ '%s: %s\\n' % (m.role, m.content) }}{{ m | tojson }}"
                "{{ [m.role, m.content] | join(' ') ~ '\\n' }}{% endfor %}{{ messages | tojson }}")
    t0 = time.perf_counter()
    ours = render_chat(template, messages)
    assert time.perf_counter() - t0 < 2
    assert ours == _transformers(template, messages)


def test_integer_literal_too_long_to_compile_is_a_model_error():
    # The compiler writes a folded constant back as decimal: Python refuses past 4300 digits.
    with pytest.raises(ModelError, match=r"^t\.jinja: chat template does not compile: ValueError"):
        render_chat("{{ 'x' | center(0x" + "f" * 5000 + ") }}", MESSAGES, source="t.jinja")
    with pytest.raises(ModelError, match="filter 'center' was given an integer of 4000 bits, over the"):
        render_chat("{{ 'x' | center(0x" + "f" * 1000 + ") }}", MESSAGES, source="t.jinja")


def test_hostile_message_still_names_the_file():
    with pytest.raises(ModelError, match=r"^t\.jinja: chat template stopped: '%' writes the width"):
        render_chat('{{ "%0999999999d" % 1 }}', MESSAGES, source="t.jinja")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer (no model) whose tokenizer_config.json sets bos and eos but no unk or pad token."""
    pytest.importorskip("transformers")
    from helpers_hf import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path)
    return path


def _with_template(path, template):
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("template", [
    GENERATION,
    "{{ unk_token is defined }}|{{ pad_token is defined }}|{{ bos_token is defined }}|{{ eos_token }}"
    "|{{ unk_token | default('no unk') }}|{{ mask_token is defined }}",
], ids=["generation-tag", "absent-special-tokens"])
def test_checkpoint_template_matches_transformers(tokenizer_dir, template):
    from transformers import AutoTokenizer

    from nexusrt.models.tokenizer import HFTokenizer

    path = _with_template(tokenizer_dir, template)
    ours = HFTokenizer(path).apply_chat_template(MESSAGES)
    theirs = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                           tokenize=False)
    assert ours == theirs
