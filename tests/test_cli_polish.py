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
    """Records the messages each turn sends; replies with the turn number. ``template_error``:
    what its chat template raises on every conversation (the start-up probe included)."""

    backend = "cpu"

    class model:
        name = "fake"

    def __init__(self, template_error=None):
        self.calls = []
        self.template_error = template_error
        llm = self

        class tokenizer:
            @staticmethod
            def apply_chat_template(messages):
                if llm.template_error is not None:
                    raise llm.template_error
                return "".join(m["content"] for m in messages)

        self.tokenizer = tokenizer

    def stream_chat(self, history, system=None, **kw):
        self.calls.append(([dict(m) for m in history], system))
        if history[-1]["content"] == "too long":
            raise ValueError("the prompt is 999 tokens but the context holds 10")
        if history[-1]["content"] == "refused":  # as a template's raise_exception, at the first next()
            from nexusrt.errors import ModelError

            raise ModelError("tokenizer_config.json (chat_template): chat template error: refused")
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


def test_a_template_error_in_one_turn_drops_that_turn_only(capsys):
    import io

    from nexusrt.cli.chat import run_chat

    llm = _FakeLLM()
    assert run_chat(llm, None, {}, stdin=io.BytesIO(b"a\nrefused\nb\n")) == 0  # the session went on
    assert [[m["content"] for m in h] for h, _ in llm.calls][-1] == ["a", "reply1", "b"]  # 'refused' dropped
    out, err = capsys.readouterr()
    assert out.splitlines() == ["reply1", "reply3"]
    assert "error: tokenizer_config.json (chat_template): chat template error: refused; /reset starts over" in err


def test_chat_checks_the_template_before_the_first_prompt(capsys):
    import io

    from nexusrt.cli.chat import run_chat
    from nexusrt.errors import ModelError

    llm = _FakeLLM(ModelError("tokenizer.json: this tokenizer has no chat_template"))
    with pytest.raises(ModelError, match="cannot chat with fake: tokenizer.json: this tokenizer has no chat_template"):
        run_chat(llm, None, {}, stdin=io.BytesIO(b"a\n"))
    assert llm.calls == [] and "nexusrt chat:" not in capsys.readouterr().err  # no greeting, no turn


def _tiny_copy(tmp_path, template):
    """nexusrt:stdlib-tiny copied with ``template`` as its chat template (None: none at all); its
    manifest removed, since the SHA-256 check refuses a changed copy."""
    import json as _json
    from pathlib import Path

    import nexusrt

    dest = tmp_path / "tiny"
    shutil.copytree(Path(nexusrt.__file__).parent / "models" / "stdlib_tiny", dest)
    (dest / "manifest.json").unlink()
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _json.loads((dest / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(_json.dumps(cfg))
    return dest


@pytest.mark.parametrize("template, pattern", [
    (None, r"cannot chat with tiny: .*tokenizer.json: this tokenizer has no chat_template"),
    ("{% for m in messages %", r"cannot chat with tiny: .*chat template does not compile"),
    ("{{ raise_exception('no chats here') }}", r"cannot chat with tiny: .*chat template error: no chats here"),
])
def test_chat_without_a_usable_template_fails_at_start(tmp_path, template, pattern):
    model = _tiny_copy(tmp_path, template)
    rc, out, err, _, _ = run_bounded(CLI, "chat", "--model", str(model), "--max-new-tokens", "2", stdin="hi\n")
    _one_line_error(rc, err, pattern)  # one line: the greeting and the prompt never came
    assert out == ""


def test_chat_goes_on_after_a_turn_its_template_refuses(tmp_path):
    template = ("{% for m in messages %}{% if 'bad' in m['content'] %}{{ raise_exception('bad is refused') }}"
                "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n")
    model = _tiny_copy(tmp_path, template)
    rc, out, err, _, _ = run_bounded(CLI, "chat", "--model", str(model), "--max-new-tokens", "2",
                                     "--temperature", "0", stdin="bad\nhi\n")
    assert rc == 0, err
    assert out.strip() and err.count("> ") == 3  # 'bad' refused, 'hi' answered, then end of input
    assert "chat template error: bad is refused; /reset starts over" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, pattern", [
    (["generate", "--prompt", "x", "--max-new-tokens", "1.5"],
     r"^nexusrt: error: argument --max-new-tokens: invalid int value: '1.5' \(see nexusrt generate --help\)$"),
    (["generate", "--prompt", "x", "--backend", "tpu"], r"argument --backend: invalid choice: 'tpu'"),
    (["generate"], r"one of the arguments --prompt --prompt-file is required \(see nexusrt generate --help\)"),
    (["generate", "--prompt", "x", "--nope"], r"unrecognized arguments: --nope"),
    (["serve", "--port", "99999"], r"argument --port: must be in 0..65535, got 99999 \(see nexusrt serve --help\)"),
    (["serve", "--port", "-1"], r"argument --port: must be in 0..65535, got -1"),
    (["frobnicate"], r"argument COMMAND: invalid choice: 'frobnicate'"),
    ([], r"the following arguments are required: COMMAND \(see nexusrt --help\)"),
])
def test_usage_errors_are_one_line_and_exit_1(argv, pattern, capsys):
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    _one_line_error(1, err, pattern)
    assert out == "" and "usage:" not in err


def test_help_and_version_still_exit_0(capsys):
    assert cli.main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nexusrt generate") and "--max-new-tokens" in out
    assert cli.main(["--version"]) == 0


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path):
    import socket

    absent = str(tmp_path / "absent")  # loading it would fail: the address error must come first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err, _, seconds = run_bounded(CLI, "serve", "--model", absent, "--port", str(port))
    _one_line_error(rc, err, rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use$")
    # An address of no interface here (TEST-NET-1, RFC 5737): refused by bind, with no name lookup.
    rc, _, err, _, _ = run_bounded(CLI, "serve", "--model", absent, "--host", "192.0.2.1")
    _one_line_error(rc, err, r"cannot listen on 192\.0\.2\.1:8000: Cannot assign requested address$")


def test_check_can_listen():
    import socket

    from nexusrt.cli.address import check_can_listen

    check_can_listen("127.0.0.1", 0)  # any free port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: Address already in use$"):
            check_can_listen("127.0.0.1", port)
    check_can_listen("127.0.0.1", port)  # closed again: free, and the probe left nothing bound
    check_can_listen("127.0.0.1", port)


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


class _GoneStdout:
    """A stdout whose reader left (``| head``) or whose disk is full, after the first write."""

    def __init__(self, exc: OSError):
        self.exc, self.writes = exc, 0

    def write(self, text):
        self.writes += 1
        if self.writes > 1:
            raise self.exc
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("exc", [BrokenPipeError(32, "Broken pipe"), OSError(28, "No space left on device")])
def test_a_chat_whose_stdout_fails_raises_that_error_and_leaves_the_model_closable(tiny_llm, monkeypatch, exc):
    import io
    import sys

    from nexusrt.cli.chat import run_chat

    monkeypatch.setattr(sys, "stdout", _GoneStdout(exc))
    with pytest.raises(type(exc)) as info:  # not "close() was called ... an open stream", which hid it
        run_chat(tiny_llm, None, {"max_new_tokens": 50, "temperature": 0}, stdin=io.BytesIO(b"hi\nthere\n"))
    assert info.value is exc
    tiny_llm.close()  # the reply's stream was closed on the way out: nothing holds the runner


def test_a_chat_line_over_the_prompt_limit_ends_the_chat_in_bounded_memory(monkeypatch):
    import io

    from nexusrt.cli import chat

    monkeypatch.setattr(chat, "MAX_PROMPT_BYTES", 1000)
    stdin = io.BytesIO(b"x" * 5000)  # as /dev/zero: no newline at all
    with pytest.raises(ValueError, match="standard input: a line longer than the 1000-byte prompt limit"):
        chat.run_chat(_FakeLLM(), None, {}, stdin=stdin)
    assert stdin.tell() == 1001  # read no further than the limit


def test_text_the_output_encoding_cannot_hold_is_named_as_such():
    rc, out, err, _, _ = run_bounded(CLI, "generate", *TINY, "--prompt", "hé", env={"PYTHONIOENCODING": "ascii"})
    _one_line_error(rc, err, r"cannot write the text in the output's encoding \(ascii\).*PYTHONIOENCODING=utf-8")


@pytest.mark.parametrize("after_s", [0.15, 0.4, 0.8])
def test_ctrl_c_while_the_command_starts_is_one_line_not_a_traceback(after_s):
    # The package used to import NumPy and ml_dtypes (~0.6 s) before the command's handler was
    # in place: a press then printed a 20-line traceback.
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers_bounded import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "NEXUSRT_BACKEND": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", CLI, "generate", *TINY, "--prompt", "hi"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # 130 and one line; -2 if the press came before Python's handler existed; 0 if it came too late
    assert proc.returncode in (130, -signal.SIGINT, 0), (proc.returncode, err)
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1] == "nexusrt: interrupted", err
