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
