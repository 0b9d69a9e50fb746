"""Held-out perplexity (``nexusrt.models.quality``) and ``nexusrt-bench --stage quality`` on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.bench.main import main
from nexusrt.models import quality


def test_uniform_logits_have_the_vocabulary_as_perplexity():
    ids = np.arange(1000) % 97
    p = quality.perplexity(lambda chunk: np.zeros((len(chunk), 97), np.float32), ids, window=300)
    assert p.perplexity == pytest.approx(97.0, rel=1e-12)
    assert p.tokens == 1000 - math.ceil(1000 / 300)  # the first id of each window is context only


def test_a_model_that_knows_the_next_id_scores_near_one():
    ids = np.arange(50) % 7

    def oracle(chunk):
        logits = np.full((len(chunk), 7), -30.0, np.float32)
        logits[np.arange(len(chunk) - 1), chunk[1:]] = 30.0  # the true next id, far ahead
        return logits

    assert quality.perplexity(oracle, ids, window=16).perplexity == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="window must be"):
        quality.perplexity(lambda c: np.zeros((len(c), 4)), [1, 2, 3], window=1)
    with pytest.raises(ValueError, match="nothing to score"):
        quality.perplexity(lambda c: np.zeros((len(c), 4)), [1], window=8)
    with pytest.raises(ValueError, match="do not score"):
        quality.perplexity(lambda c: np.zeros((2, 4)), [1, 2, 3], window=8)
    with pytest.raises(nrt.ModelError, match="heldout.json.gz: missing"):
        quality.heldout_documents("/nonexistent")


def test_heldout_tokens_are_capped_and_start_with_bos():
    from nexusrt.models import load_model

    tok = load_model("nexusrt:stdlib-tiny").tokenizer
    docs = quality.heldout_documents()
    ids = quality.heldout_tokens(tok, docs, max_tokens=700)
    assert len(ids) == 700 and ids[0] == tok.bos_id
    assert len(quality.heldout_tokens(tok, docs)) > 10_000  # the whole held-out set


def test_bench_quality_on_the_cpu_matches_hf(capsys):
    pytest.importorskip("transformers")
    rc = main(["--stage", "quality", "--backend", "cpu", "--tokens", "600", "--window", "256", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    assert r["model"] == "nexusrt:stdlib-tiny" and r["note"] == ""  # the default without --model
    assert r["tokens"] == 600 - 3 and r["window"] == 256
    from nexusrt.models import load_model

    vocab = load_model("nexusrt:stdlib-tiny").config.vocab_size
    assert 1.0 < r["perplexity"] < vocab / 20  # far better than chance: it learned the language
    hf = r["hf"]["float32"]
    assert hf["tokens"] == r["tokens"] and abs(hf["nexusrt_over_hf"] - 1) < 1e-4


def test_bench_quality_table_and_unknown_model(capsys):
    assert main(["--stage", "quality", "--backend", "cpu", "--tokens", "100", "--no-hf",
                 "--model", "nexusrt:stdlib-tiny"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens scored" in out and "99 (windows of 512)" in out
    assert main(["--stage", "quality", "--backend", "cpu", "--tokens", "300", "--model", "synthetic:tiny"]) == 0
    out = capsys.readouterr().out
    assert "synthetic:tiny" in out and "random weights" in out and "no checkpoint for HF" in out
    assert main(["--stage", "quality", "--backend", "cpu", "--model", "nexusrt:nope"]) == 1
    err = capsys.readouterr().err
    assert "nexusrt:nope" in err and "nexusrt:stdlib-tiny" in err


def test_bench_quality_on_a_checkpoint_directory_uses_its_tokenizer(capsys):
    pytest.importorskip("transformers")
    from helpers_hf import checkpoint

    path = checkpoint("qwen3")  # random weights, its own 320-id tokenizer: scored like any model
    assert main(["--stage", "quality", "--backend", "cpu", "--model", str(path), "--tokens", "300",
                 "--window", "128", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == str(path) and r["note"] == "" and r["tokens"] == 300 - 3
    assert abs(r["hf"]["float32"]["nexusrt_over_hf"] - 1) < 1e-4


def test_window_is_capped_at_the_model_context(capsys):
    pytest.importorskip("transformers")
    from helpers_hf import checkpoint

    path = checkpoint("llama")  # max_position_embeddings 512
    assert main(["--stage", "quality", "--backend", "cpu", "--model", str(path), "--tokens", "700",
                 "--window", "2048", "--no-hf", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["window"] == 512 and r["tokens"] == 700 - 2
