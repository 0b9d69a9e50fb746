"""``nexusrt generate --kv-*`` in a subprocess: the ``kv`` object of ``--json`` and bad flags as
one-line errors before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "import os\nimport sys\n\ndef main(argv):\n    "


def _generate(*args):
    env = {**os.environ, "NEXUSRT_BACKEND": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nexusrt.cli.main", "generate", "--model", "nexusrt:stdlib-tiny",
                           "--backend", "cpu", "--prompt", PROMPT, "--temperature", "0", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_json_reports_the_kv_cache():
    full = _generate("--max-new-tokens", "40", "--json")
    assert full.returncode == 0, full.stderr
    kv = json.loads(full.stdout)["kv"]
    assert kv["policy"] == "full" and kv["tokens_evicted"] == 0 and kv["budget"] is None
    pruned = _generate("--max-new-tokens", "40", "--json", "--kv-policy", "h2o", "--kv-budget", "32")
    assert pruned.returncode == 0, pruned.stderr
    out = json.loads(pruned.stdout)
    kv = out["kv"]
    assert kv["policy"] == "h2o" and kv["budget"] == 32 and kv["tokens_kept"] == 32
    assert kv["tokens_evicted"] == out["prompt_tokens"] + len(out["token_ids"]) - 1 - 32
    assert kv["pages_host"] == kv["blocks_host"] == 0 and kv["host_tier"].startswith("off")
    assert all(kv[k] == 0 for k in ("faults_posted", "faults_serviced", "faults_overflow", "faults_left", "bytes_moved"))
    streamed = _generate("--max-new-tokens", "40", "--kv-policy", "h2o", "--kv-budget", "32")
    assert streamed.returncode == 0 and streamed.stdout == out["text"] + "\n"


def test_bad_kv_flags_are_one_line_errors():
    for flags, words in [(("--kv-policy", "h2o", "--kv-budget", "2"), "must exceed kv_sinks"),
                         (("--kv-policy", "sink-window"), "needs kv_budget"),
                         (("--kv-policy", "h2o", "--kv-budget", "-8"), "kv_budget must be an integer >= 0")]:
        proc = _generate(*flags)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
