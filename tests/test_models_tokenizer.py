"""Tokenizers against HF's AutoTokenizer; chat templates; incremental detokenisation."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from helpers_hf import BOS_ID, checkpoint, copy_checkpoint  # noqa: E402

from nexusrt.errors import ModelError  # noqa: E402
from nexusrt.models.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder  # noqa: E402

TEXTS = ["Hello world", "The quick brown fox, 3.14159!", "café naïve 東京 🙂 Москва", "  spaces  ", ""]
MESSAGES = [{"role": "system", "content": "Be brief. "},
            {"role": "user", "content": 'Hi <there> & "you" 🙂'},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to three."}]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    path = checkpoint("llama")
    return HFTokenizer(path), AutoTokenizer.from_pretrained(str(path))


def test_encode_decode_match_hf(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids
        assert ids[0] == BOS_ID
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_chat_template_matches_hf(pair):
    ours, hf = pair
    text = ours.apply_chat_template(MESSAGES)
    assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|system|>\nBe brief.</s>") and text.endswith("<|assistant|>\n")
    assert ours.encode_chat(MESSAGES) == list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)["input_ids"])
    assert ours.encode_chat(MESSAGES).count(BOS_ID) == 1  # the template's BOS only
    with pytest.raises(ModelError, match="chat template error: unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_add_bos_token_and_missing_template(tmp_path):
    import json

    path = copy_checkpoint("llama", tmp_path / "m")
    tok_json = json.loads((path / "tokenizer.json").read_text())
    tok_json["post_processor"] = None  # Llama 2 style: BOS comes from add_bos_token
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(path)
    assert tok.encode("Hello")[0] == BOS_ID and tok.encode("Hello")[1:] == tok.encode("Hello", False)
    assert tok.encode("Hello", add_special_tokens=False)[0] != BOS_ID
    with pytest.raises(ModelError, match="has no chat_template"):
        tok.apply_chat_template(MESSAGES)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert HFTokenizer(path).apply_chat_template(MESSAGES[:2]) == '[Be brief. ][Hi <there> & "you" 🙂]'


@pytest.mark.parametrize("which", ["hf", "bytes"])
def test_incremental_decode_concatenates_to_full_decode(pair, which):
    tok = pair[0] if which == "hf" else ByteTokenizer()
    text = "Unicode: café, 東京 and 🙂🙂 — plus a tail."
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streamed, not one piece at the end


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("hé")
    assert ids == [256, 104, 195, 169]
    assert tok.decode(ids + [257, 300, 104]) == "héh"
    assert tok.decode(ids + [257], skip_special_tokens=False) == "<|bos|>hé<|eos|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"
    # An id that adds no text (random weights pick ids far above 257) does not split a character:
    # streaming skips such ids, so the streamed text must equal decode(ids) with them in.
    assert tok.decode([0xE2, 300, 0x82, 5000, 0xAC]) == "€"


def test_streamed_text_equals_decode_for_random_byte_ids():
    import numpy as np

    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(30):  # what synthetic weights emit: bytes, broken UTF-8, and ids the bytes never reach
        ids = [int(i) for i in rng.choice(np.r_[rng.integers(0, 256, 40), [256, 257, 300, 70000]], 60)]
        dec = IncrementalDecoder(tok)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == tok.decode(ids), ids


def test_encoding_a_long_prompt_lets_other_threads_run():
    """A server tokenizes on a worker thread; its event loop must go on meanwhile, so encode must
    release the GIL (``tokenizers``' encode does not, its encode_batch does)."""
    import threading
    import time
    from pathlib import Path

    import nexusrt

    tok = HFTokenizer(Path(nexusrt.__file__).parent / "models" / "stdlib_tiny")
    text = "import os\n" * 200_000
    took = []
    worker = threading.Thread(target=lambda: took.append((time.perf_counter(), len(tok.encode(text)),
                                                          time.perf_counter())))
    t0 = time.perf_counter()
    worker.start()
    ticks = 0
    while worker.is_alive():
        time.sleep(0.002)
        ticks += 1
    worker.join()
    (_, n, t1), = took
    assert n > 200_000
    # Holding the GIL, the loop above would tick about once in the whole encode.
    assert ticks >= min(20, (t1 - t0) / 0.02), (ticks, t1 - t0)


def _trained(kind: str):
    """A small tokenizers.Tokenizer of one of the pipelines the checkpoints we load use."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = ["def main():\n    return os.path.join(a, b)  # café 東京 🙂 Москва", "    " * 40 + "x" * 60] * 50
    if kind == "wordpiece":  # whitespace is dropped before the model sees it: no bound
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
        return tok
    if kind == "metaspace":  # Llama 2 / Mistral: prepend and replace in the normalizer, byte fallback
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.ByteFallback()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + [f"<0x{i:02X}>" for i in range(256)])
    else:  # byte-level, with NFC for "nfc" (Qwen 2) or without (Llama 3)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if kind == "nfc":
            tok.normalizer = normalizers.NFC()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|a_rather_long_special_token|>"])
    return tok


@pytest.mark.parametrize("kind", ["bytelevel", "nfc", "metaspace", "wordpiece"])
def test_min_tokens_never_exceeds_what_encoding_gives(kind):
    from nexusrt.models.tokenizer import _bytes_per_token

    tok = _trained(kind)
    per = _bytes_per_token(tok)
    assert (per is None) == (kind == "wordpiece")
    if per is None:
        return
    longest = max(tok.get_vocab(with_added_tokens=True), key=lambda s: len(s.encode()))
    texts = ["    " * 500, "x" * 3000, "<|a_rather_long_special_token|>" * 100, "\u212a" * 500,  # Kelvin sign
             "\U0001d400" * 500, "e\u0301" * 500, "\u1100\u1161\u11a8" * 300, "東京🙂" * 300, "\x00\x01\t" * 300,
             longest.replace("Ġ", " ").replace("▁", " ") * 200]
    for text in texts:
        n = len(tok.encode_batch([text], add_special_tokens=False)[0].ids)
        assert -(-len(text.encode()) // per) <= n, (kind, text[:20], per, n)


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing(monkeypatch):
    import time

    import nexusrt as nrt
    from nexusrt.engine.prompts import PromptTooLong

    llm = nrt.LLM("nexusrt:stdlib-tiny", backend="cpu")
    try:
        calls = []
        monkeypatch.setattr(llm.tokenizer, "encode", lambda *a, **k: calls.append(1) or [])
        t0 = time.perf_counter()
        with pytest.raises(PromptTooLong, match=r"at least \d+ tokens \(from its length, not tokenized\) but the "
                                                r"context holds 2048") as info:
            llm.generate("import os\n" * 5_000_000, max_new_tokens=1)  # 50 MB
        assert info.value.at_least and info.value.tokens > 2048 and not calls
        assert time.perf_counter() - t0 < 10  # the UTF-8 length of 50 MB; encoding it took 70 s and 9 GB
        with pytest.raises(PromptTooLong, match="at least"):
            llm.generate("x" * 1_000_000, max_new_tokens=1, chat=True)  # the rendered chat is what is bounded
    finally:
        llm.close()


def _edit_json(path, edit) -> None:
    import json

    data = json.loads(path.read_text()) if path.exists() else {}
    edit(data)
    path.write_text(json.dumps(data))


def _hf_and_ours_agree(path, texts) -> HFTokenizer:
    from transformers import AutoTokenizer

    ours, hf = HFTokenizer(path), AutoTokenizer.from_pretrained(str(path))
    for text in texts:
        for specials in (True, False):
            assert ours.encode(text, specials) == hf.encode(text, add_special_tokens=specials), (text, specials)
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.encode_chat(MESSAGES) == list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)["input_ids"])
    assert ours.eos_ids == (hf.eos_token_id,) and ours.bos_id == hf.bos_token_id
    return ours


@pytest.mark.parametrize("state", ["truncation", "padding"])
def test_truncation_or_padding_saved_in_tokenizer_json_is_ignored_as_hf_does(tmp_path, state):
    # transformers saves the backend as last configured; its encode ignores that state.
    path = copy_checkpoint("llama", tmp_path / "m")
    saved = {"truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
             "padding": {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 1, "pad_type_id": 0, "pad_token": "</s>"}}[state]
    _edit_json(path / "tokenizer.json", lambda t: t.__setitem__(state, saved))
    ours = _hf_and_ours_agree(path, TEXTS[:3])
    assert len(ours.encode("The quick brown fox jumps over the lazy dog.")) > 8  # neither cut nor padded
    assert len(ours.encode("hi")) < 8


def test_special_tokens_and_added_tokens_named_only_in_the_config_files_are_hfs(tmp_path):
    # Tokens tokenizer.json lacks get the next ids in transformers' order (added_tokens_decoder,
    # the special tokens, additional_special_tokens), whatever id a config file writes beside them.
    path = copy_checkpoint("llama", tmp_path / "m")
    vocab = HFTokenizer(path).vocab_size

    def config(c):
        c["eos_token"] = "<|im_end|>"  # not in tokenizer.json
        c["added_tokens_decoder"] = {str(vocab + 7): {"content": "<|tool|>", "special": False},
                                     "2": {"content": "<|user|>", "special": True}}  # already there
        c["additional_special_tokens"] = ["<|extra|>"]

    _edit_json(path / "tokenizer_config.json", config)
    # With added_tokens_decoder there, transformers reads neither legacy file: no <|pad|>.
    _edit_json(path / "special_tokens_map.json", lambda m: m.update(pad_token="<|pad|>", eos_token="<s>"))
    (path / "added_tokens.json").write_text('{"<a1>": 5}')
    texts = ["a<|im_end|>b<|tool|>c<|extra|>d<|pad|><a1>", "<|user|>x<|tool|>", "plain text"]
    ours = _hf_and_ours_agree(path, texts)
    assert ours.encode("<|tool|><|im_end|><|extra|>", False) == [vocab, vocab + 1, vocab + 2]
    assert ours.decode([vocab, vocab + 1]) == "<|tool|>"  # a non-special added token stays in the text
    assert "pad_token" not in ours.special_tokens

    # An older checkpoint: special_tokens_map.json wins over tokenizer_config.json, and
    # added_tokens.json's tokens come by id (<a1> first).
    _edit_json(path / "tokenizer_config.json", lambda c: c.pop("added_tokens_decoder"))
    (path / "added_tokens.json").write_text('{"<b2>": 999, "<a1>": 5}')
    ours = _hf_and_ours_agree(path, texts + ["x<a1>y<b2>z"])
    assert ours.encode("<a1><b2>", False) == [vocab, vocab + 1] and ours.eos_ids == (0,)
    assert ours.encode("<|pad|>", False) == [vocab + 2]


def test_an_absent_special_token_is_undefined_in_the_template(tmp_path):
    from transformers import AutoTokenizer

    path = copy_checkpoint("llama", tmp_path / "m")
    (path / "chat_template.jinja").write_text("{{ unk_token is defined }} {{ eos_token is defined }}")
    assert HFTokenizer(path).apply_chat_template(MESSAGES) == "False True"
    assert AutoTokenizer.from_pretrained(str(path)).apply_chat_template(MESSAGES, tokenize=False) == "False True"


def test_a_whitespace_stripping_added_token_voids_the_length_bound(tmp_path):
    # "<|user|>" with lstrip takes 300,000 spaces before it into its one id: no bound from bytes.
    path = copy_checkpoint("llama", tmp_path / "m")
    _edit_json(path / "tokenizer.json", lambda t: t["added_tokens"][2].__setitem__("lstrip", True))
    ours = HFTokenizer(path)
    text = " " * 300_000 + "<|user|>hi"
    assert ours.min_tokens(text) <= len(ours.encode(text, False)) < 10


def test_a_model_that_fails_only_when_encoding_is_named(tmp_path):
    path = copy_checkpoint("llama", tmp_path / "m")

    def unigram(t):
        t.update(model={"type": "Unigram", "unk_id": None, "vocab": [["a", -1.0]]}, added_tokens=[],
                 normalizer=None, pre_tokenizer=None, post_processor=None, decoder=None)

    _edit_json(path / "tokenizer.json", unigram)
    with pytest.raises(ModelError, match=r"tokenizer\.json: cannot encode the text: .*unk"):
        HFTokenizer(path).encode("zzz")
