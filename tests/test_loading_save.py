"""Our safetensors writer and synthetic checkpoints saved to disk (CPU)."""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

from nexusrt.errors import ModelError
from nexusrt.models import PRESETS, load_model
from nexusrt.models.safetensors import SafetensorsIndex
from nexusrt.models.streaming import SafetensorsWriter, save_synthetic_checkpoint
from nexusrt.models.streaming.writer import header_bytes
from nexusrt.models.synthetic import SyntheticWeights


def test_writer_output_reads_back_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.integers(-9, 9, size=(4,), dtype=np.int64)
    c = rng.standard_normal((2, 3)).astype(np.float16)
    p = tmp_path / "w.safetensors"
    with SafetensorsWriter(p, [("a", "F32", (3, 5)), ("b", "I64", (4,)), ("c", "F16", (2, 3))],
                           {"format": "pt"}) as w:
        w.write("a", a[:1])  # a tensor may come in pieces
        w.write("a", a[1:])
        w.write("b", b)
        w.write("c", c)
    got = load_file(str(p))
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and np.array_equal(got["c"], c)
    n = int.from_bytes(p.read_bytes()[:8], "little")
    assert n % 8 == 0 and json.loads(p.read_bytes()[8:8 + n])["__metadata__"] == {"format": "pt"}


def test_writer_refuses_out_of_order_too_much_and_incomplete(tmp_path):
    entries = [("x", "F32", (2,)), ("y", "F32", (2,))]
    with SafetensorsWriter(tmp_path / "o.safetensors", entries, sync=False) as w:
        with pytest.raises(ValueError, match="header order"):
            w.write("y", np.zeros(2, np.float32) + 1)
        with pytest.raises(ValueError, match="only 8 left"):
            w.write("x", np.ones(3, np.float32))
        w.write("x", np.ones(2, np.float32))
        w.write("y", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="after every tensor"):
            w.write("y", np.ones(1, np.float32))
    w = SafetensorsWriter(tmp_path / "i.safetensors", entries, sync=False)
    w.write("x", np.ones(2, np.float32))
    with pytest.raises(ModelError, match="'y' incomplete"):
        w.close()
    with pytest.raises(ValueError, match="appears twice"):
        header_bytes([("x", "F32", (1,)), ("x", "F32", (1,))])


def test_synthetic_checkpoint_loads_and_matches_the_synthetic_weights(tmp_path):
    out = save_synthetic_checkpoint("tiny", tmp_path / "ck", seed=3, shard_bytes=120_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in SafetensorsIndex.from_dir(out).tensors.values())
    model = load_model(out)
    want = dataclasses.replace(PRESETS["tiny"], torch_dtype="bfloat16")
    assert model.config == want
    syn = SyntheticWeights.from_preset("tiny", seed=3)
    for spec in syn.specs():
        got = model.weights.load(spec.name, np.float32)
        ref = syn.load(spec.name)
        stored = model.weights.ref(spec.name).dtype
        if spec.kind in ("norm", "bias"):
            assert stored == "F32" and np.array_equal(got, ref), spec.name  # exact
        else:
            assert stored == "BF16", spec.name
            assert np.array_equal(got, ref.astype(ml_dtypes.bfloat16).astype(np.float32)), spec.name
    assert model.tokenizer.decode(model.tokenizer.encode("weights, café")) == "weights, café"
    assert model.tokenizer.encode("AB", add_special_tokens=False) == [65, 66]


def test_single_file_and_file_order(tmp_path):
    out = save_synthetic_checkpoint("tiny", tmp_path, seed=0)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    infos = sorted(SafetensorsIndex.from_dir(out).tensors.values(), key=lambda i: i.offset)
    # the reference library's order: wider dtypes first, then by name
    keys = [(-(4 if i.dtype == "F32" else 2), i.name) for i in infos]
    assert keys == sorted(keys)
    other = save_synthetic_checkpoint("tiny", tmp_path / "again", seed=0)
    assert (other / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    seeded = save_synthetic_checkpoint("tiny", tmp_path / "seed1", seed=1)
    assert (seeded / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()
