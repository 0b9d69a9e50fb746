"""Compile every kernel source for the given archs with NVRTC (no GPU needed).

``python -m nexusrt.kernels.check [--cache] [sm_80 sm_90a ...]`` exits non-zero on the first
source that does not compile, printing NVRTC's log. CI runs it so a broken kernel never waits
for a GPU to be found out. With ``--cache`` the cubins go through the on-disk cache
(``$NEXUSRT_CACHE_DIR``) and fill it, so a GPU machine that is handed that folder (same NVRTC
major.minor, the device's arch: ``sm_90a`` for Hopper) loads them instead of compiling on its
first run; a source whose cubin is missing or stale is compiled there as usual.
"""

from __future__ import annotations

import sys
import time

from ..errors import CompileError
from .compiler import all_sources, compile_file

DEFAULT_ARCHS = ("sm_80", "sm_90a")


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    use_cache = "--cache" in args
    archs = [a for a in args if a != "--cache"] or list(DEFAULT_ARCHS)
    bad = [a for a in archs if not a.startswith("sm_")]
    if bad:
        print(f"usage: python -m nexusrt.kernels.check [--cache] [sm_XY ...]; not an arch: {' '.join(bad)}",
              file=sys.stderr)
        return 2
    failed = 0
    for arch in archs:
        for name in all_sources():
            t0 = time.perf_counter()
            try:
                result = compile_file(name, arch, use_cache=use_cache)
            except CompileError as exc:
                print(f"FAIL {name}.cu for {arch}\n{exc}", file=sys.stderr)
                failed += 1
                continue
            how = " (cached)" if result.cached else ""
            print(f"ok   {name}.cu for {arch}: {len(result.cubin)} bytes, {time.perf_counter() - t0:.1f}s{how}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
