"""``nexusrt`` with a standard stream closed (``<&-``, ``>&-``, ``2>&-``) or opened the wrong way.

stdin and stdout carry the prompt and the reply: a command that needs a closed one fails in one
line naming the stream, before the model loads (a missing model directory would be the error
otherwise). stderr only carries notices: closed, it is dropped and the command still works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ("--model", "synthetic:tiny", "--backend", "cpu", "--max-new-tokens", "4", "--temperature", "0")
ABSENT = "/nonexistent/nexusrt-model"  # loading it would fail: an error about a stream proves it came first


def _run(*args, close=(), read_only_stderr=False, stdin=subprocess.DEVNULL, module="nexusrt.cli.main"):
    """``python -m nexusrt.cli.main ARGS`` with the descriptors in ``close`` closed at start-up;
    ``read_only_stderr``: descriptor 2 a file opened for reading (a launcher's script, as a pyenv
    shim leaves it). Returns (status, stdout bytes, stderr bytes, or None where it was closed)."""
    def setup():
        for fd in close:
            os.close(fd)
        if read_only_stderr:
            os.dup2(os.open(sys.executable, os.O_RDONLY), 2)

    env = {**os.environ, "NEXUSRT_BACKEND": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("NEXUSRT_DEBUG", None)
    out = None if 1 in close else subprocess.PIPE
    err = None if 2 in close or read_only_stderr else subprocess.PIPE
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          stdin=None if 0 in close else stdin, stdout=out, stderr=err,
                          preexec_fn=setup, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(rc, err: bytes, pattern: str, prog: str = "nexusrt") -> None:
    text = err.decode()
    lines = text.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith(f"{prog}: error: ") and re.search(pattern, lines[0]), lines[0]
    assert "internal error" not in lines[0]


@pytest.mark.parametrize("args, pattern", [
    (("generate", "--model", ABSENT, "--prompt", "-"), r"stdin is closed: --prompt - reads the prompt from it"),
    (("chat", "--model", ABSENT), r"stdin is closed: nexusrt chat reads each turn from it"),
])
def test_a_closed_stdin_is_named_before_the_model_loads(args, pattern):
    rc, out, err = _run(*args, close=(0,))
    _one_line_error(rc, err, pattern)
    assert out == b""


def test_a_closed_stdout_is_named_before_the_model_loads():
    rc, _, err = _run("generate", "--model", ABSENT, "--prompt", "x", close=(1,))
    _one_line_error(rc, err, r"stdout is closed: nowhere to write the completion")
    rc, _, err = _run("chat", "--model", ABSENT, close=(1,))
    _one_line_error(rc, err, r"stdout is closed: nowhere to write the reply")


def test_a_closed_stdin_does_not_matter_when_the_prompt_is_a_flag():
    rc, out, err = _run("generate", *TINY, "--prompt", "hi", close=(0,))
    assert rc == 0 and len(out.decode()) > 1, err


@pytest.mark.parametrize("how", ["closed", "read-only"])
def test_a_closed_stderr_is_dropped_and_generation_still_works(how):
    ref_rc, ref_out, ref_err = _run("generate", "--backend", "cpu", "--max-new-tokens", "4", "--temperature", "0",
                                    "--prompt", "import os")
    assert ref_rc == 0 and b"no --model given" in ref_err, ref_err  # the notice normally on stderr
    rc, out, _ = _run("generate", "--backend", "cpu", "--max-new-tokens", "4", "--temperature", "0",
                      "--prompt", "import os", close=(2,) if how == "closed" else (),
                      read_only_stderr=how == "read-only")
    assert rc == 0
    assert out == ref_out  # the completion alone: the notice did not fall back to stdout


def test_a_closed_stderr_still_exits_1_on_an_error():
    rc, out, _ = _run("generate", "--model", ABSENT, "--prompt", "x", close=(2,))
    assert rc == 1 and out == b""


def test_usable_judges_the_descriptor_mode(tmp_path):
    from nexusrt.cli.streams import usable

    f = tmp_path / "f"
    f.write_text("x")
    with open(f) as reading, open(f, "a") as writing:
        assert usable(reading, readable=True) and not usable(reading, readable=False)
        assert usable(writing, readable=False) and not usable(writing, readable=True)
    assert not usable(None, readable=True)
    import io

    assert usable(io.StringIO(), readable=False)  # no descriptor: nothing known to fail


def test_nexusrt_bench_with_a_closed_stdout_or_stderr():
    rc, _, err = _run("--stage", "detect", close=(1,), module="nexusrt.bench.main")
    _one_line_error(rc, err, r"stdout is closed: nowhere to write the figures", prog="nexusrt-bench")
    rc, out, _ = _run("--stage", "detect", close=(2,), module="nexusrt.bench.main")
    assert rc == 0 and b"total" in out, out
