"""Hostile checkpoint directories: every case is a clear error naming the file and key, fast,
in bounded memory, and nothing loads from outside the directory."""

from __future__ import annotations

import json
import struct
import time

import pytest

pytest.importorskip("transformers")

from helpers_bounded import CLI, run_bounded  # noqa: E402
from helpers_hf import copy_checkpoint  # noqa: E402

from nexusrt.errors import ModelError  # noqa: E402
from nexusrt.models import load_model  # noqa: E402


@pytest.fixture
def ckpt(tmp_path):
    return copy_checkpoint("qwen2", tmp_path / "m")


def _edit(path, name, **changes):
    d = json.loads((path / name).read_text()) if (path / name).exists() else {}
    d.update(changes)
    (path / name).write_text(json.dumps(d))


def _fails_fast(path, message, seconds=3.0):
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=message):
        load_model(path)
    assert time.perf_counter() - t0 < seconds


def test_header_naming_a_tensor_twice(ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n].decode().rstrip(), raw[8 + n:]
    first = json.loads(header, object_pairs_hook=lambda pairs: pairs)[0]
    dup = header[:-1] + ", " + json.dumps(first[0]) + ": " + json.dumps(dict(first[1])) + "}"
    f.write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + data)
    _fails_fast(ckpt, f"model.safetensors \\(header\\): key '{first[0]}' appears twice")


@pytest.mark.parametrize("changes, message", [
    ({"tie_word_embeddings": "false"}, "config.json: tie_word_embeddings must be true or false, got 'false'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "config.json: rope_scaling.factor is nan"),
    ({"rope_theta": float("inf")}, "config.json: rope_theta is inf"),
    ({"num_hidden_layers": 10**8}, "config.json: num_hidden_layers must be an integer in \\[1, 1024\\]"),
    ({"vocab_size": 10**12}, "config.json: vocab_size must be an integer in"),
    ({"num_attention_heads": 0}, "config.json: num_attention_heads must be an integer in"),
    ({"rms_norm_eps": 0.0}, "config.json: rms_norm_eps must be a positive number"),
    ({"architectures": {"a": 1}}, "config.json: architectures must be a list of str"),
    ({"hidden_act": ["silu"]}, "config.json: hidden_act must be a string"),
    ({"sliding_window": "4096", "use_sliding_window": "yes"}, "config.json: use_sliding_window must be true or false"),
])
def test_config_values(ckpt, changes, message):
    _edit(ckpt, "config.json", **changes)
    _fails_fast(ckpt, message)


@pytest.mark.parametrize("changes, message", [
    ({"do_sample": True, "top_p": 0}, "generation_config.json: top_p must be a positive number <= 1.0, got 0"),
    ({"do_sample": True, "top_p": 1.5}, "generation_config.json: top_p must be a positive number"),
    ({"do_sample": "true"}, "generation_config.json: do_sample must be true or false, got 'true'"),
    ({"top_k": -1}, "generation_config.json: top_k must be an integer >= 0"),
    ({"temperature": "hot"}, "generation_config.json: temperature must be a finite number"),
    ({"max_new_tokens": "5"}, "generation_config.json: max_new_tokens must be an integer"),
    ({"eos_token_id": [1, "2"]}, "generation_config.json: eos_token_id must be a token id or a list"),
    ({"eos_token_id": 10**9}, "eos_token_id must be a token id or a list of token ids below the vocabulary size"),
])
def test_generation_config_values(ckpt, changes, message):
    _edit(ckpt, "generation_config.json", **changes)
    _fails_fast(ckpt, message)


@pytest.mark.parametrize("changes, message", [
    ({"add_bos_token": "yes"}, "tokenizer_config.json: add_bos_token must be true or false"),
    ({"bos_token": 5}, "tokenizer_config.json: bos_token must be a string, got 5"),
    ({"eos_token": {"content": 3}}, "tokenizer_config.json: eos_token.content must be a string"),
    ({"chat_template": 7}, "tokenizer_config.json: chat_template must be a string, got 7"),
    ({"chat_template": [{"name": "default"}]}, "missing required key 'chat_template\\[0\\].template'"),
])
def test_tokenizer_config_values(ckpt, changes, message):
    _edit(ckpt, "tokenizer_config.json", **changes)
    _fails_fast(ckpt, message)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "model.safetensors.index.json"])
def test_deeply_nested_json_in_every_file(ckpt, name):
    (ckpt / name).write_text('{"a": ' + "[" * 200000 + "]" * 200000 + "}")
    _fails_fast(ckpt, f"{name}: nested deeper than 64 levels")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_an_integer_of_more_digits_than_python_converts(ckpt, name):
    d = json.loads((ckpt / name).read_text())
    (ckpt / name).write_text(json.dumps(d)[:-1] + ', "foo": ' + "1" * 5000 + "}")
    _fails_fast(ckpt, f"{name}: not a JSON document this loader takes .*4300 digits")


def test_a_hub_cache_ref_that_is_huge_or_binary_costs_nothing(tmp_path, monkeypatch):
    from nexusrt.models.hub import find_cached

    repo = tmp_path / "models--org--bad"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for content in (b"\xff\xfe", b"0" * (64 << 20)):  # binary; 64 MB (was read whole)
        (repo / "refs" / "main").write_bytes(content)
        t0 = time.perf_counter()
        assert find_cached("org/bad") == repo / "snapshots" / "abc"  # no usable ref: the newest snapshot
        assert time.perf_counter() - t0 < 1


def test_tokenizer_json_nested(ckpt):
    (ckpt / "tokenizer.json").write_text("[" * 200000 + "]" * 200000)
    _fails_fast(ckpt, "tokenizer.json: cannot load")


# A pattern that backtracks exponentially on "a" * 40 + "b": Oniguruma stops it at its retry limit,
# and tokenizers' Rust code panics, which reaches Python as a BaseException (PanicException).
_BACKTRACKS = {"type": "Replace", "pattern": {"Regex": "(a|aa)+$"}, "content": "x"}


def test_a_tokenizer_regex_that_backtracks_is_an_error_naming_the_file(ckpt):
    _edit(ckpt, "tokenizer.json", normalizer=_BACKTRACKS)
    tok = load_model(ckpt).tokenizer
    assert tok.encode("plain text")  # the pattern only fails where it backtracks
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"tokenizer\.json: cannot encode the text: .*retry-limit"):
        tok.encode("a" * 40 + "b")
    assert time.perf_counter() - t0 < 3


def test_a_tokenizer_decoder_that_backtracks_is_an_error_naming_the_file(ckpt):
    tokens = json.loads((ckpt / "tokenizer.json").read_text())
    tokens["decoder"] = {"type": "Sequence", "decoders": [tokens["decoder"], _BACKTRACKS]}
    (ckpt / "tokenizer.json").write_text(json.dumps(tokens))
    tok = load_model(ckpt).tokenizer
    ids = tok.encode("a" * 40 + "b")
    with pytest.raises(ModelError, match=rf"tokenizer\.json: cannot decode {len(ids)} token ids: .*retry-limit"):
        tok.decode(ids)


def test_special_file_as_a_weight(ckpt):
    import os

    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    _fails_fast(ckpt, "model.safetensors: not a regular file")


def test_index_pointing_outside_is_refused_end_to_end(ckpt, tmp_path):
    other = copy_checkpoint("qwen2", tmp_path / "other")
    names = list(json.loads((other / "model.safetensors").read_bytes()[8:8 + struct.unpack(
        "<Q", (other / "model.safetensors").read_bytes()[:8])[0]]))
    (ckpt / "model.safetensors").unlink()
    wmap = {n: "../other/model.safetensors" for n in names if n != "__metadata__"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    _fails_fast(ckpt, "shard '../other/model.safetensors' is outside the checkpoint directory")


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran more than"),
    ("{{ 'x' * 10**9 }}", "repeated 1000000000 times"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "concatenation"),
    ("{% set ns = namespace(s=['x']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'\\+' over"),
    ("{{ 'x' | center(10**9) }}", "filter 'center' was given 1000000000"),
    ("{{ 'x'.ljust(10**9) }}", "call of 'ljust' was given"),
    # Widths inside format strings, and arguments that multiply each other, allocate before any
    # result can be measured: refused before the call.
    ('{{ "%03000000000d" | format(1) }}', "filter 'format' writes the width 03000000000"),
    ('{{ "{:>999999999}".format(1) }}', "call of 'format' writes the width 999999999"),
    ('{{ ("a\n" * 2000000) | indent(2000000) | length }}', "filter 'indent' would build a value of"),
    ("{{ (['x' * 4000000] * 1000) | join }}", "filter 'join' would build a value of"),
    ("{{ (['x' * 4000000] * 1000) | map('lower') | join }}", "filter 'join' would build a value of"),
    ("{{ ''.join(['x' * 4000000] * 1000) }}", "call of 'join' would build a value of"),
    ("{{ ('x' * 4000000) | replace('x', 'yyyy') }}", "filter 'replace' would build a value of"),
    ("{{ 2 ** (10 ** 9) }}", "too large to compute"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ (1, 2) + 3 }}", "TypeError"),
    ("{{ messages.append(1) }}", "SecurityError"),
    ("{{ raise_exception('bad role') }}", "chat template error: bad role"),
    ("{% for %}", "does not compile"),
])
def test_chat_template_limits(ckpt, template, message):
    (ckpt / "chat_template.jinja").write_text(template)
    tok = load_model(ckpt).tokenizer
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=f"chat_template.jinja: .*{message}"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 5


def test_template_in_tokenizer_config_is_named(ckpt):
    _edit(ckpt, "tokenizer_config.json", chat_template="{{ 1 // 0 }}")
    with pytest.raises(ModelError, match="tokenizer_config.json \\(chat_template\\): chat template failed to render: "
                                         "ZeroDivisionError"):
        load_model(ckpt).tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_limits_hold_memory_in_a_capped_process(ckpt):
    (ckpt / "chat_template.jinja").write_text(
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")
    rc, out, err, rss, seconds = run_bounded(CLI, "generate", "--model", str(ckpt), "--prompt", "hi", "--chat",
                                             "--max-new-tokens", "2")
    assert rc == 1 and "chat_template.jinja: chat template stopped" in err and "Traceback" not in err
    assert rss < 1024 and seconds < 30


def test_huge_layer_count_fails_fast_in_bounded_memory(ckpt):
    _edit(ckpt, "config.json", num_hidden_layers=10**8)
    rc, out, err, rss, seconds = run_bounded(CLI, "generate", "--model", str(ckpt), "--prompt", "hi")
    assert rc == 1 and "num_hidden_layers must be an integer in [1, 1024], got 100000000" in err
    assert rss < 1024 and seconds < 30


def _huge_checkpoint(ckpt, layers: int):
    """A consistent checkpoint of ``layers`` big layers: a real header over a sparse data file."""
    from nexusrt.models.config import ModelConfig
    from nexusrt.models.weights import tensor_specs

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_hf(cfg)
    header, offset = {}, 0
    for spec in tensor_specs(config):
        n = 2
        for d in spec.shape:
            n *= d
        header[spec.hf_name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f = ckpt / "model.safetensors"
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        out.truncate(8 + len(blob) + offset)  # sparse: no disk, no page cache
    return config


def test_model_that_does_not_fit_is_refused_before_loading(ckpt):
    from nexusrt.engine.fit import cpu_available, footprint

    free, _ = cpu_available()
    per_layer = 4 * 8192 * (8192 + 2 * 1024 + 8192 + 3 * 28672)
    layers = min(1000, 4 * free // per_layer + 1)
    config = _huge_checkpoint(ckpt, layers)
    need = footprint(config, "cpu", 64).total
    assert need > free
    rc, out, err, rss, seconds = run_bounded(CLI, "generate", "--model", str(ckpt), "--prompt", "hi",
                                             "--max-context", "64")
    assert rc == 1, err
    assert f"does not fit: it needs {need / 2**30:.2f} GiB" in err and "available (" in err
    assert rss < 1024 and seconds < 30


def test_fit_message_suggests_a_shorter_context():
    from nexusrt.engine.fit import check_fit
    from nexusrt.errors import ModelTooLarge
    from nexusrt.models.presets import preset

    cfg = preset("llama-3.2-1b")  # 1.24 B params: ~4.6 GiB fp32, KV 131072 tokens fp32 ~ 8 GiB
    with pytest.raises(ModelTooLarge, match=r"m does not fit: it needs .* GiB of KV cache at 131072 tokens \(lower it "
                                            r"with max_context / --max-context\)\) but this machine has 6.00 GiB "
                                            r"available \(test\)") as info:
        check_fit(cfg, "cpu", None, "m", available=(6 << 30, "test"))
    assert info.value.available == 6 << 30 and info.value.needed > 6 << 30
    assert check_fit(cfg, "cpu", 4096, "m", available=(6 << 30, "test")).context == 4096


def test_template_time_limit():
    from nexusrt.models.chat import render_chat
    from nexusrt.models.template import Limits

    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="t.jinja: chat template stopped: it ran longer than 0.2 s"):
        render_chat(loops, [{"role": "user", "content": "hi"}], source="t.jinja",
                    limits=Limits(max_steps=10**12, seconds=0.2))
    assert time.perf_counter() - t0 < 2


_MANY_CASES = r'''
import json, os, shutil, struct, sys, tempfile, time
from pathlib import Path
from nexusrt.errors import ModelError
from nexusrt.models.chat import render_chat
from nexusrt.models.config import load_config
from nexusrt.models.safetensors import SafetensorsFile

d = Path(tempfile.mkdtemp())
cases = []
(d / "config.json").write_text("[" * 1000000 + "]" * 1000000)
cases.append(("deep config", lambda: load_config(d)))
big = d / "big.safetensors"
with open(big, "wb") as f:  # claims the largest header the format allows, over a sparse file
    f.write(struct.pack("<Q", 100 * 1024 * 1024))
    f.truncate(8 + 100 * 1024 * 1024)
cases.append(("huge header", lambda: SafetensorsFile(big)))
for t in ["{{ 'x' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 'ab' | center(10**9) }}", "{{ 'x' | indent(10**9) }}",
          "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"]:
    cases.append((t, lambda t=t: render_chat(t, [{"role": "user", "content": "hi"}], source="t.jinja")))
for name, fn in cases:
    t0 = time.perf_counter()
    try:
        fn()
        sys.exit(f"{name}: no error")
    except ModelError as exc:
        assert time.perf_counter() - t0 < 10, name
        print(name, "->", str(exc)[:80])
shutil.rmtree(d)
'''


def test_many_hostile_inputs_in_one_capped_process():
    rc, out, err, rss, seconds = run_bounded(_MANY_CASES)
    assert rc == 0, err
    assert len(out.splitlines()) == 7 and "t.jinja: chat template stopped" in out
    assert rss < 1024, f"peak RSS {rss:.0f} MiB"
    assert seconds < 60


def test_nan_weights_are_a_clear_error_greedy_and_sampled(ckpt):
    """A checkpoint of NaN weights: greedy argmax called every NaN row token 0, and a sampled step
    died of an IndexError in the candidates; both now end with one line naming the cause."""
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    f.write_bytes(raw[:8 + n] + b"\xc0\x7f" * ((len(raw) - 8 - n) // 2))  # bf16 NaN everywhere
    for extra in ([], ["--temperature", "1"]):
        rc, out, err, rss, seconds = run_bounded(CLI, "generate", "--model", str(ckpt), "--prompt", "hi",
                                                 "--max-new-tokens", "3", *extra)
        assert rc == 1 and "hold" in err and "NaN" in err and "not finite" in err and "Traceback" not in err, err
