"""NVRTC: CUDA C++ source -> cubin for the device's exact arch, with an on-disk cache.

We emit cubin, never PTX: a newer NVRTC from PyPI writes PTX that an older driver
refuses, while cubin for the exact arch loads. The cache key covers the source, every
header it may include from ``cu/``, the options, the arch and the NVRTC version, so a
second boot compiles nothing and any change recompiles.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..driver.calls import nvrtc, nvrtc_call, nvrtc_compile, out_buffer

SOURCE_DIR = Path(str(resources.files(__package__).joinpath("cu")))

BASE_OPTIONS = ["-std=c++17", "--device-as-default-execution-space", "-default-device"]


def cache_dir() -> Path:
    """Where compiled cubins live: ``$NEXUSRT_CACHE_DIR`` or ``~/.cache/nexusrt/kernels``."""
    root = os.environ.get("NEXUSRT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "nexusrt" / "kernels"


def nvrtc_version() -> tuple[int, int]:
    major, minor = nvrtc_call("nvrtcVersion")
    return int(major), int(minor)


def include_dirs() -> list[str]:
    """Header folders: our own ``cu/``, then cudart's and CCCL's from the pip packages."""
    dirs = [str(SOURCE_DIR)]
    try:
        import cuda.pathfinder as pathfinder

        for lib in ("cudart", "cccl"):
            found = pathfinder.find_nvidia_header_directory(lib)
            if found:
                dirs.append(str(found))
    except Exception:  # no pathfinder: rely on NVRTC's built-in headers
        pass
    return dirs


@dataclass(frozen=True)
class CompileResult:
    cubin: bytes
    cached: bool
    key: str
    log: str = ""


def source_path(name: str) -> Path:
    """The ``.cu`` file of a kernel source by name (``"rmsnorm"`` or ``"rmsnorm.cu"``)."""
    fname = name if name.endswith(".cu") else f"{name}.cu"
    path = SOURCE_DIR / fname
    if not path.is_file():
        available = sorted(p.stem for p in SOURCE_DIR.glob("*.cu"))
        raise ValueError(f"no kernel source {fname!r}: available are {', '.join(available)}")
    return path


def _headers_digest() -> bytes:
    h = hashlib.sha256()
    for p in sorted(SOURCE_DIR.glob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.digest()


def compile_source(source: str, name: str, arch: str, extra_options: tuple[str, ...] = (),
                   use_cache: bool = True) -> CompileResult:
    """Compile CUDA C++ ``source`` (shown as ``name`` in errors) to cubin for ``arch``."""
    options = BASE_OPTIONS + [f"--gpu-architecture={arch}"] + list(extra_options)
    options += [f"-I{d}" for d in include_dirs()]
    version = nvrtc_version()
    key_material = [source.encode(), _headers_digest(), " ".join(
        o for o in options if not o.startswith("-I")).encode(), arch.encode(), repr(version).encode()]
    key = hashlib.sha256(b"\0".join(key_material)).hexdigest()[:32]
    path = cache_dir() / f"{Path(name).stem}-{arch}-{key}.cubin"
    if use_cache and path.is_file():
        return CompileResult(path.read_bytes(), True, key)

    program = nvrtc_call("nvrtcCreateProgram", source.encode(), name.encode(), 0, [], [])
    try:
        nvrtc_compile(program, options, name)
        size = nvrtc_call("nvrtcGetCUBINSize", program)
        cubin = out_buffer(size)
        nvrtc_call("nvrtcGetCUBIN", program, cubin)
        log_size = nvrtc_call("nvrtcGetProgramLogSize", program)
        log = out_buffer(log_size)
        nvrtc_call("nvrtcGetProgramLog", program, log)
    finally:
        nvrtc().nvrtcDestroyProgram(program)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return CompileResult(bytes(cubin), False, key, bytes(log).decode(errors="replace").rstrip("\x00"))


def compile_file(name: str, arch: str, extra_options: tuple[str, ...] = (),
                 use_cache: bool = True) -> CompileResult:
    """Compile ``cu/<name>.cu`` for ``arch``."""
    path = source_path(name)
    return compile_source(path.read_text(), path.name, arch, extra_options, use_cache)


def all_sources() -> list[str]:
    """Names of every kernel source shipped in ``cu/``."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.cu"))
