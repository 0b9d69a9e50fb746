"""``nexusrt generate`` in a subprocess: streaming, --json, and one-line errors with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from helpers_hf import checkpoint, copy_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run(*args, check_rc=None):
    env = {**os.environ, "NEXUSRT_BACKEND": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "nexusrt.cli.main", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def _generate(model, *extra, check_rc=None):
    return _run("generate", "--model", model, "--backend", "cpu", *extra, check_rc=check_rc)


def test_help():
    out = _run("--help", check_rc=0).stdout
    assert "generate" in out
    out = _run("generate", "--help", check_rc=0).stdout
    for flag in ("--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--chat", "--json"):
        assert flag in out
    bare = _run()  # no command: a usage error like any other, one line and status 1
    assert bare.returncode == 1 and bare.stderr.strip().splitlines() == [
        "nexusrt: error: the following arguments are required: COMMAND (see nexusrt --help)"]


def test_json_and_stream_agree_with_the_api(cpu_rt):
    import nexusrt as nrt

    path = checkpoint("qwen3")
    res = json.loads(_generate(path, "--prompt", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0",
                               "--json", check_rc=0).stdout)
    for key in ("text", "token_ids", "prompt_tokens", "ttft_s", "tokens_per_s"):
        assert key in res
    api = nrt.LLM(path, backend="cpu").generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert res["token_ids"] == api.token_ids and res["text"] == api.text
    assert res["prompt_tokens"] == api.prompt_tokens and res["ttft_s"] > 0
    streamed = _generate(path, "--prompt", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0",
                         check_rc=0)
    assert streamed.stdout == api.text + "\n"
    assert "tokens/s" in streamed.stderr and "Traceback" not in streamed.stderr


def test_synthetic_seeded_sampling_and_chat():
    args = ("--prompt", "hi", "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9",
            "--seed", "5", "--json")
    a = json.loads(_generate("synthetic:tiny", *args, check_rc=0).stdout)
    b = json.loads(_generate("synthetic:tiny", *args, check_rc=0).stdout)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 8 and a["seed"] == 5
    chat = json.loads(_generate("synthetic:tiny", *args, "--chat", check_rc=0).stdout)
    assert chat["prompt_tokens"] == len("<|user|>\nhi\n<|assistant|>\n".encode())


def _expect_error(proc, pattern):
    import re

    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("nexusrt: error: ") and re.search(pattern, lines[0]), lines[0]


def test_expected_errors_exit_1_without_traceback(tmp_path):
    _expect_error(_generate(tmp_path / "nothing", "--prompt", "x"), "no such directory")
    _expect_error(_generate("synthetic:tiny", "--prompt", "x", "--temperature", "-1"), "temperature must")
    _expect_error(_generate("synthetic:tiny", "--prompt", "x", "--top-p", "2"), "top_p must")
    _expect_error(_generate("synthetic:tiny", "--prompt", "a long prompt", "--max-context", "4"),
                  "prompt is 14 tokens but the context holds 4")
    broken = copy_checkpoint("qwen2", tmp_path / "trunc")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    _expect_error(_generate(broken, "--prompt", "x"), r"model\.safetensors: tensor '.*':.*truncated")
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(cfg))
    _expect_error(_generate(broken, "--prompt", "x"), "config.json: missing required key 'num_hidden_layers'")
