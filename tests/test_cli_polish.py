"""First use of ``nexusrt``: --version, prompts from stdin and files, --system, chat, HF repo ids,
and no traceback for any error (unless --debug)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")

from helpers_bounded import CLI, run_bounded  # noqa: E402
from helpers_hf import checkpoint  # noqa: E402

from nexusrt.cli import main as cli  # noqa: E402
from nexusrt.cli.guard import describe  # noqa: E402

TINY = ("--model", "synthetic:tiny", "--backend", "cpu", "--max-new-tokens", "4", "--temperature", "0")


def _one_line_error(rc, err, pattern):
    import re

    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("nexusrt: error: ") and re.search(pattern, lines[0]), lines[0]


def test_version():
    import nexusrt

    rc, out, err, _, _ = run_bounded(CLI, "--version")
    assert rc == 0 and out.strip() == f"nexusrt {nexusrt.__version__}"


def test_prompt_from_stdin_and_file_match_the_flag(tmp_path):
    ref = json.loads(run_bounded(CLI, "generate", *TINY, "--json", "--prompt", "héllo\nworld")[1])
    rc, out, err, _, _ = run_bounded(CLI, "generate", *TINY, "--json", "--prompt", "-", stdin="héllo\nworld")
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == ref["token_ids"] and ref["prompt_tokens"] == 1 + len("héllo\nworld".encode())
    f = tmp_path / "p.txt"
    f.write_text("héllo\nworld", encoding="utf-8")
    rc, out, err, _, _ = run_bounded(CLI, "generate", *TINY, "--json", "--prompt-file", str(f))
    assert rc == 0 and json.loads(out)["token_ids"] == ref["token_ids"]


def test_bad_prompts_are_one_line_errors(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xe9")
    _one_line_error(*run_bounded(CLI, "generate", *TINY, "--prompt-file", str(f))[:3:2],
                    r"--prompt-file .*bad.txt: not valid UTF-8 text \(byte 3")
    _one_line_error(*run_bounded(CLI, "generate", *TINY, "--prompt-file", str(tmp_path / "absent"))[:3:2],
                    "--prompt-file .*absent: No such file")
    code = "import os, sys; sys.argv += [os.fsdecode(b'caf\\xe9')]; " + CLI
    _one_line_error(*run_bounded(code, "generate", *TINY, "--prompt")[:3:2], "--prompt: not valid UTF-8 text")


def test_system_implies_chat():
    out = json.loads(run_bounded(CLI, "generate", *TINY, "--json", "--prompt", "hi", "--system", "sys")[1])
    assert out["prompt_tokens"] == len("<|system|>\nsys\n<|user|>\nhi\n<|assistant|>\n".encode())


def test_chat_session_end_to_end():
    rc, out, err, _, seconds = run_bounded(CLI, "chat", *TINY, "--system", "be brief",
                                           stdin="hello\n/nope\n\nagain\n/reset\nthird\n/exit\nnever\n")
    assert rc == 0, err
    assert len(out.splitlines()) == 3  # three replies, one per user line; '/exit' stopped before 'never'
    assert "unknown command /nope" in err and "(history cleared)" in err and "Traceback" not in err


class _FakeLLM:
    """Records the messages each turn sends; replies with the turn number."""

    backend = "cpu"

    class model:
        name = "fake"

    def __init__(self):
        self.calls = []

    def stream_chat(self, history, system=None, **kw):
        self.calls.append(([dict(m) for m in history], system))
        if history[-1]["content"] == "too long":
            raise ValueError("the prompt is 999 tokens but the context holds 10")
        yield f"reply{len(self.calls)}"


def test_chat_keeps_history_and_resets(capsys):
    import io

    from nexusrt.cli.chat import run_chat

    llm = _FakeLLM()
    stdin = io.BytesIO(b"a\nb\ntoo long\n/reset\nc\n\xff\xfe\n")
    assert run_chat(llm, "S", {}, stdin=stdin) == 0
    msgs = [[m["content"] for m in h] for h, _ in llm.calls]
    assert msgs == [["a"], ["a", "reply1", "b"], ["a", "reply1", "b", "reply2", "too long"], ["c"]]
    assert all(s == "S" for _, s in llm.calls)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["reply1", "reply2", "reply4"]
    assert "context holds 10; /reset starts over" in err and "not valid UTF-8" in err


def test_hf_repo_id_from_the_local_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-qwen"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in checkpoint("qwen3").iterdir():  # the cache layout: blobs, with snapshot symlinks into them
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache)}
    rc, out, err, _, _ = run_bounded(CLI, "generate", "--model", "acme/tiny-qwen", "--prompt", "Once", "--json",
                                     "--max-new-tokens", "3", "--temperature", "0", env=env)
    assert rc == 0, err
    assert json.loads(out)["model"] == "acme/tiny-qwen" and len(json.loads(out)["token_ids"]) == 3
    rc, out, err, _, _ = run_bounded(CLI, "generate", "--model", "acme/absent", "--prompt", "x", env=env)
    _one_line_error(rc, err, "model 'acme/absent': not a directory, and not in the Hugging Face cache .*"
                             "fetch it first with `hf download acme/absent`")


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import nexusrt.engine.llm as llm_mod

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(llm_mod, "LLM", boom)
    monkeypatch.delenv("NEXUSRT_DEBUG", raising=False)
    assert cli.main(["generate", "--model", "synthetic:tiny", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("nexusrt: error: internal error: KeyError: 'surprise' (run with --debug or "
                           "NEXUSRT_DEBUG=1 for the traceback)")
    assert cli.main(["generate", "--model", "synthetic:tiny", "--prompt", "x", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("KeyError: 'surprise' (run with --debug or NEXUSRT_DEBUG=1 "
                                                       "for the traceback)")
    monkeypatch.setenv("NEXUSRT_DEBUG", "1")
    assert cli.main(["generate", "--model", "synthetic:tiny", "--prompt", "x"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("exc, text", [
    (MemoryError(), "out of memory (try a smaller model or --max-context)"),
    (RecursionError("maximum recursion depth exceeded"), "input nested too deeply to process (RecursionError)"),
    (OSError(6, "No such device or address", "/dev/weird"), "/dev/weird: No such device or address"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "invalid text: 'utf-8' codec can't decode"),
    (ValueError("line one\nline two"), "line one"),
])
def test_describe(exc, text):
    assert describe(exc).startswith(text)
