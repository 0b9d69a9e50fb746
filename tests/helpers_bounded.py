"""Run hostile input in a child process under a memory cap and a time limit, and report both.

The child gets ``RLIMIT_AS`` (so a regression fails the test instead of taking the machine
down) and prints its peak resident memory last on stderr; :func:`run_bounded` returns it.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP_BYTES = 3 << 30

_WRAPPER = """
import resource, sys
code = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    exec(compile(code, "<bounded>", "exec"), {"__name__": "__main__"})
finally:
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def run_bounded(code: str, *args: str, timeout: float = 60, stdin: str | None = None, env: dict | None = None):
    """Run ``code`` (Python source; ``sys.argv[1:]`` are ``args``) capped; returns
    ``(returncode, stdout, stderr without the rss line, peak rss MiB, seconds)``."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "NEXUSRT_BACKEND": "cpu", **(env or {})}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAPPER, code, *args], capture_output=True, text=True,
                       timeout=timeout, input=stdin, env=full_env, preexec_fn=_cap)
    seconds = time.perf_counter() - t0
    m = re.search(r"MAXRSS_KB (\d+)\s*$", p.stderr)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    stderr = p.stderr[:m.start()] if m else p.stderr
    return p.returncode, p.stdout, stderr, rss, seconds


CLI = "import sys; from nexusrt.cli.main import main; sys.exit(main(sys.argv[1:]))"


# Renders each template of a {name: template} dict in one child (run_bounded's caps) and prints,
# per template, its error, seconds and the peak of memory Python allocated while it ran.
_RENDER_ALL = r'''
import json, sys, time, tracemalloc
from nexusrt.models.chat import render_chat
cases = json.loads(sys.stdin.read())
render_chat("{{ 1 }}", [{"role": "user", "content": "hi"}])  # imports and first compile out of the way
for name, template in cases.items():
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        render_chat(template, [{"role": "user", "content": "hi"}], source="t.jinja")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"name": name, "error": error, "seconds": seconds, "peak_mib": peak / 2**20}), flush=True)
'''


def render_templates_bounded(cases: dict, timeout: float = 300):
    """Render every template of ``cases`` (name -> template text) with ``render_chat`` in one capped
    child (a template that hangs in C code or allocates gigabytes fails the test, not the machine);
    returns ``(results by name, returncode, stderr, peak rss MiB)``; each result has ``error``
    (None or "Type: message"), ``seconds`` and ``peak_mib`` (tracemalloc's peak while it ran)."""
    import json

    rc, out, err, rss, _ = run_bounded(_RENDER_ALL, stdin=json.dumps(cases), timeout=timeout)
    results = {r["name"]: r for r in map(json.loads, out.splitlines())}
    return results, rc, err, rss


def check_refused(rendered, name: str, pattern: str, max_peak_mib: float, max_seconds: float = 3) -> None:
    """Assert that template ``name`` of a :func:`render_templates_bounded` result was refused by the
    sandbox (a ModelError naming t.jinja, matching ``pattern``) fast and in little memory."""
    results, rc, err, _ = rendered
    assert name in results, f"the child stopped before {name} (rc {rc}): {err[-2000:]}"
    r = results[name]
    assert r["error"] is not None, "rendered without an error"
    assert r["error"].startswith("ModelError: t.jinja: chat template stopped: "), r["error"]
    assert re.search(pattern, r["error"]), r["error"]
    assert r["seconds"] < max_seconds, r
    assert r["peak_mib"] < max_peak_mib, r
