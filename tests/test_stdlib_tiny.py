"""``nexusrt:stdlib-tiny``, the trained model that ships in the package, on the CPU.

Trained weights give peaked logits, so greedy continuations are compared with HF
transformers for exact equality: no tie may excuse a difference. The shipped files are
checked against the manifest's hashes; a copy with one flipped byte must be refused.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_hf import hf_greedy, load_hf  # noqa: E402

import nexusrt as nrt  # noqa: E402
from nexusrt.backends.base import generate_tokens  # noqa: E402
from nexusrt.backends.cpu.model import CpuRunner  # noqa: E402
from nexusrt.reference.sampling import SamplingParams  # noqa: E402
from nexusrt.models import load_model  # noqa: E402
from nexusrt.models.shipped import DEFAULT_MODEL, SHIPPED, read_manifest, verify_manifest  # noqa: E402

PATH = SHIPPED["stdlib-tiny"]
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n",
           "class Queue:\n    \"\"\"A first-in, first-out queue.\"\"\"\n\n    def __init__(self",
           "# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for", "    for i in range(len("]
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf():
    return load_hf(PATH, "float32")


def test_shape_size_and_manifest(model):
    cfg, manifest = model.config, read_manifest(PATH)
    assert model.name == DEFAULT_MODEL and model.path == PATH
    assert cfg.architecture == "LlamaForCausalLM" and cfg.head_dim == 64
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.max_position_embeddings >= 2048 and cfg.vocab_size <= 8192
    assert (PATH / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    assert model.weights.ref("layers.0.q").dtype == "BF16"
    assert manifest["steps"] > 0 and manifest["command"].startswith("python3 scripts/train_reference.py")
    # The held-out files are neither trained on nor missing from the shipped evaluation text.
    data = manifest["data"]
    assert data["eval"] and not set(data["eval"]) & set(data["train"])
    from nexusrt.models.quality import heldout_documents

    assert [d["file"] for d in heldout_documents()] == data["eval"]


@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json", "config.json", "heldout.json.gz"])
def test_a_changed_file_is_refused_naming_it(tmp_path, victim):
    copy = shutil.copytree(PATH, tmp_path / "copy")
    verify_manifest(copy)  # the intact copy passes
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(nrt.ModelError, match=f"{victim}: SHA-256 .* does not match"):
        load_model(copy)


def test_a_missing_or_unlisted_file_is_refused(tmp_path):
    copy = shutil.copytree(PATH, tmp_path / "copy")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(nrt.ModelError, match=r"tokenizer.json: missing \(listed in manifest.json\)"):
        load_model(copy)
    copy2 = shutil.copytree(PATH, tmp_path / "copy2")
    manifest = json.loads((copy2 / "manifest.json").read_text())
    del manifest["sha256"]["model.safetensors"]  # a manifest cannot wave a file through by omission
    (copy2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(nrt.ModelError, match="no hash for model.safetensors"):
        load_model(copy2)


@pytest.mark.parametrize("name", ["nexusrt:stdlib-huge", "synthetic:llama-9b"])
def test_unknown_preset_lists_the_presets(name):
    with pytest.raises(nrt.ModelError) as exc:
        load_model(name)
    msg = str(exc.value)
    assert name.split(":")[1] in msg and "nexusrt:stdlib-tiny" in msg and "synthetic:tiny" in msg


def test_tokenizer_and_chat_template_agree_with_hf(model):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(PATH))
    for text in PROMPTS + ["naïve café 東京 🙂\n\t  x = 1"]:
        assert model.tokenizer.encode(text) == ref.encode(text)
        ids = model.tokenizer.encode(text)
        assert model.tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What does os.path.join do?"}]
    ours = model.tokenizer.apply_chat_template(messages)
    assert ours == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|assistant|>\n")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_128_tokens_equal_hf_exactly(model, hf, prompt):
    ids = model.tokenizer.encode(prompt)
    ref_ids, ref_logits = hf_greedy(hf, ids, NEW_TOKENS)
    ours: list[int] = []
    runner = CpuRunner(model.weights)
    generate_tokens(runner, ids, NEW_TOKENS, SamplingParams(temperature=0), lambda t: ours.append(t) or False)
    first = next((i for i, (a, b) in enumerate(zip(ours, ref_ids)) if a != b), None)
    gap = None if first is None else float(np.diff(np.sort(ref_logits[first])[-2:])[0])
    assert ours == ref_ids, f"first difference at step {first} (HF's top-2 gap there {gap})"
    assert len(set(ours)) >= 4  # a real continuation (greedy may loop, but not on one token)


def test_first_run_output_is_readable_python(model):
    llm = nrt.LLM(DEFAULT_MODEL, backend="cpu")
    try:
        text = llm.generate("def read_config(path):\n", max_new_tokens=64, temperature=0).text
    finally:
        llm.close()
    printable = sum(c.isprintable() or c in "\n\t" for c in text) / max(1, len(text))
    assert len(text) > 40 and printable == 1.0, text
    assert any(word in text for word in ("return", "self", "if ", "def ", "=")), text


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NEXUSRT_BACKEND": "cpu", "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", "nexusrt.cli.main", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def test_generate_without_model_uses_the_shipped_model(model):
    proc = _cli("generate", "--prompt", "def main():\n", "--max-new-tokens", "24", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("using nexusrt:stdlib-tiny") == 1
    llm = nrt.LLM(DEFAULT_MODEL, backend="cpu")
    try:
        expected = llm.generate("def main():\n", max_new_tokens=24, temperature=0).text
    finally:
        llm.close()
    assert proc.stdout == expected + "\n" and expected.strip()
    quiet = _cli("generate", "--model", DEFAULT_MODEL, "--prompt", "x", "--max-new-tokens", "2")
    assert quiet.returncode == 0 and "using nexusrt:stdlib-tiny" not in quiet.stderr  # only when defaulted


def test_generate_with_an_unknown_preset_lists_the_presets():
    proc = _cli("generate", "--model", "nexusrt:stdlib-large", "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nexusrt:stdlib-large" in proc.stderr and "nexusrt:stdlib-tiny" in proc.stderr
    assert "synthetic:llama-3.2-1b" in proc.stderr


def test_a_manifest_without_hashes_does_not_block_a_checkpoint_and_entries_cannot_leave_it(tmp_path):
    from tests import helpers_hf as H

    ckpt = H.copy_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "manifest.json").write_text(json.dumps({"name": "someone else's manifest"}))
    assert load_model(ckpt).config.vocab_size > 0  # not ours to verify: loads as before
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x" * 10)
    (ckpt / "extra.bin").symlink_to(outside)
    manifest = {"sha256": {f: "0" * 64 for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "generation_config.json", "extra.bin")}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(nrt.ModelError, match="outside the checkpoint directory"):
        load_model(ckpt)
