"""What every nexusrt-bench refusal test checks: one line on stderr, status 1, nothing on stdout."""

from __future__ import annotations

import re

from nexusrt.bench.main import main


def one_line_error(capsys, argv, pattern) -> str:
    """Run ``nexusrt-bench argv``; assert it refused in one line matching ``pattern`` (no usage
    block, no traceback, no "internal error", no figures) and return that line."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in err and "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("nexusrt-bench: error: ") and re.search(pattern, lines[0]), lines[0]
    assert out == ""
    return lines[0]
