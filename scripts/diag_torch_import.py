"""Does running NexusRT's decode in a process break a later `import torch` there?

    PYTHONPATH=. python3 scripts/diag_torch_import.py MODEL

Generates with the CUDA runner, closes everything, then imports torch; prints OK or the error.
"""
import sys

import nexusrt as nrt
from nexusrt.engine.sampling import SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "synthetic:llama-3.2-1b"
nrt.firmware.init(backend="cuda")
llm = nrt.LLM(model, max_context=256)
for _ in range(3):
    llm.runner.generate_tokens(list(range(32)), 128, SamplingParams(temperature=0.0), lambda t: False)
llm.close()
nrt.firmware.shutdown()
try:
    import torch  # noqa: F401

    print("import torch OK")
except Exception as exc:
    print(f"import torch FAILED: {exc!r}"[:200])
