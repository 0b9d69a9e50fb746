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
