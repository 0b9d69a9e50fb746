"""Diagnose the safetensors writer on the GPU machine: write, then show the header bytes."""
import pathlib
import sys
import tempfile

sys.path.insert(0, "tests")
from test_loading_cpu import write_checkpoint  # noqa: E402

SPEC = {"embed": ("BF16", (2048, 1024)), "norm": ("F32", (1024,)), "q": ("BF16", (1024, 1024)),
        "k": ("BF16", (256, 1024)), "v": ("BF16", (256, 1024)), "w32": ("F32", (1536, 1024)),
        "odd": ("BF16", (37, 29))}
d = pathlib.Path(tempfile.mkdtemp())
write_checkpoint(d / "model.safetensors", SPEC, seed=11)
raw = (d / "model.safetensors").read_bytes()
n = int.from_bytes(raw[:8], "little")
print("size", len(raw), "header", n, "tail of header", raw[8 + n - 40: 8 + n + 16])
