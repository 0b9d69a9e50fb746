"""The runtime's kernel cache: compile each source once per arch, load it once per boot."""

from __future__ import annotations

from .compiler import compile_file
from .launch import Kernel, Library


class KernelCache:
    """Libraries by source name for one device. ``get(source, kernel, signature)``."""

    def __init__(self, arch: str):
        self.arch = arch
        self.libraries: dict[str, Library] = {}
        self.compiled = 0  # sources compiled this boot (0 when the disk cache had them all)
        self.loaded_from_cache = 0

    def library(self, source: str) -> Library:
        lib = self.libraries.get(source)
        if lib is None:
            result = compile_file(source, self.arch)
            self.compiled += not result.cached
            self.loaded_from_cache += result.cached
            lib = self.libraries[source] = Library(result.cubin, source)
        return lib

    def get(self, source: str, kernel: str, signature: str) -> Kernel:
        return self.library(source).kernel(kernel, signature)

    def close(self) -> None:
        for lib in self.libraries.values():
            lib.unload()
        self.libraries.clear()
