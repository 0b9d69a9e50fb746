"""Compile every kernel source for the given archs with NVRTC (no GPU needed).

``python -m nexusrt.kernels.check [sm_80 sm_90a ...]`` exits non-zero on the first source
that does not compile, printing NVRTC's log. CI runs it so a broken kernel never waits
for a GPU to be found out.
"""

from __future__ import annotations

import sys
import time

from ..errors import CompileError
from .compiler import all_sources, compile_file

DEFAULT_ARCHS = ("sm_80", "sm_90a")


def main(argv: list[str] | None = None) -> int:
    archs = (argv if argv is not None else sys.argv[1:]) or list(DEFAULT_ARCHS)
    failed = 0
    for arch in archs:
        for name in all_sources():
            t0 = time.perf_counter()
            try:
                result = compile_file(name, arch, use_cache=False)
            except CompileError as exc:
                print(f"FAIL {name}.cu for {arch}\n{exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"ok   {name}.cu for {arch}: {len(result.cubin)} bytes, {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
