"""The strict GPU model test: ``nexusrt:stdlib-tiny`` (trained weights) against HF on the same card.

The random-weight tests in test_cuda_model.py excuse greedy differences at near-ties; a
trained model's logits are peaked, so here there is no excuse: 256 greedy tokens must equal
HF ``generate``'s (fp32 on the GPU) for every prompt, and every row of teacher-forced logits
must be within HF's own bf16 error of the fp32 reference. Held-out perplexity on the GPU
must agree with HF's on the same tokens as closely as HF's bf16 run does.
"""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.models.shipped import DEFAULT_MODEL, SHIPPED
from tests import helpers_hf as H
from tests.test_cuda_model import _check_against_hf, _hf_refs, check_greedy_against_hf

pytestmark = pytest.mark.gpu

PATH = SHIPPED["stdlib-tiny"]
# Along HF fp32's 256-token continuation of each prompt, the two best logits stay at least
# 1.9x HF bf16's largest logit error apart (measured on the CPU: top-2 gaps >= 0.17, bf16
# errors <= 0.13). Prompts whose continuations pass a near-tie (e.g. "    def __repr__(self):\n",
# gap 1e-4) would make exact equality a coin toss for any bf16 runner, HF's own included.
PROMPTS = ["# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for", "def read_config(path):\n",
           "import re\n", "if __name__ == '__main__':\n"]
NEW_TOKENS = 256


def _tokenizer():
    from nexusrt.models import load_model

    return load_model(DEFAULT_MODEL).tokenizer


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cuda_greedy_256_tokens_equal_hf_exactly(prompt, gpu_rt):
    ids = _tokenizer().encode(prompt)
    check_greedy_against_hf(PATH, ids, NEW_TOKENS, max_context=len(ids) + NEW_TOKENS + 16, label=repr(prompt),
                            tie_tol=0.0)  # no tie excuses a difference


def test_cuda_logits_per_row_within_hf_bf16_error(gpu_rt):
    """Teacher-forced over a prompt and HF's own continuation (a realistic, in-distribution sequence)."""
    tok = _tokenizer()
    ids = tok.encode(PROMPTS[0])
    model = H.load_hf(PATH, "float32", "cuda")
    ids = ids + H.hf_greedy(model, ids, NEW_TOKENS)[0]
    del model
    ref, hf_bf16 = _hf_refs(PATH, ids)
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models import load_model

    runner = CudaRunner(load_model(DEFAULT_MODEL), nrt.firmware.runtime(), max_context=len(ids))
    try:
        ours = runner.forward_all(np.asarray(ids, np.int32))
    finally:
        runner.close()
    _check_against_hf(ours, ref, hf_bf16, "stdlib-tiny")  # whole-sequence bound and greedy picks
    ours_rows = np.linalg.norm(ours - ref, axis=-1)
    hf_rows = np.linalg.norm(hf_bf16 - ref, axis=-1)
    # Per row: within 1.5x HF's bf16 error on that row, with HF's median row error as the floor
    # (a row where HF's bf16 happens to land almost exactly on fp32 must not demand the same luck).
    limit = 1.5 * np.maximum(hf_rows, np.median(hf_rows))
    bad = np.nonzero(ours_rows > limit)[0]
    assert not len(bad), f"rows {bad.tolist()[:10]}: ours {ours_rows[bad][:5]} vs limit {limit[bad][:5]}"


def test_cuda_heldout_perplexity_matches_hf(capsys):
    import json

    from nexusrt.bench.main import main

    nrt.firmware.shutdown()  # the stage boots (and shuts down) its own runtime
    assert main(["--stage", "quality", "--backend", "cuda", "--model", DEFAULT_MODEL, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    print({k: r[k] for k in ("perplexity", "tokens")}, r["hf"])
    fp32, bf16 = r["hf"]["float32"], r["hf"]["bfloat16"]
    assert r["tokens"] == fp32["tokens"] > 10_000
    # NexusRT's bf16 run is within 1.5x HF's own bf16 deviation from HF fp32's perplexity, plus
    # 0.2% (HF's bf16 errors may cancel by luck in one number; a wrong kernel moves it by far more).
    ours_dev = abs(r["perplexity"] / fp32["perplexity"] - 1)
    hf_dev = abs(bf16["perplexity"] / fp32["perplexity"] - 1)
    assert ours_dev <= 1.5 * hf_dev + 2e-3, (ours_dev, hf_dev)
