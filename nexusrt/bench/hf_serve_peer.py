"""The serve stage's peer: the same requests through HF transformers' continuous batching.

``model.generate_batch`` (transformers' paged-KV continuous batching scheduler) on the same
token ids, greedy, EOS off so every request generates exactly as many tokens as ours; fp32
on the CPU (our CPU engine is fp32 too). One warm-up batch first; the wall time of the
whole batch gives output tokens per second.
"""

from __future__ import annotations

import logging
import time


def measure(model_dir: str, requests: list[tuple[list[int], int]], max_batch_tokens: int) -> dict:
    """``requests``: (prompt ids, new tokens) each; a dict with ``output_tokens_per_s`` or ``skipped``."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
    except Exception as exc:  # the peer is optional
        return {"skipped": f"transformers/torch not importable: {exc}"}
    new = {n for _, n in requests}
    if len(new) != 1:
        return {"skipped": "the peer takes one new-token count for every request"}
    # Its CPU path logs a missing optional psutil at ERROR on every batch; that is not our run's error.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    total = sum(len(p) + n for p, n in requests)
    config = GenerationConfig(max_new_tokens=new.pop(), do_sample=False, eos_token_id=-1, pad_token_id=0,
                              block_size=16, num_blocks=total // 16 + 2 * len(requests) + 16,
                              max_batch_tokens=max_batch_tokens, use_cuda_graph=False)
    with torch.inference_mode():
        model.generate_batch(inputs=[p[:16] for p, _ in requests[:2]], generation_config=config)  # warm-up
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=[p for p, _ in requests], generation_config=config)
        wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"output_tokens_per_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "requests": len(out), "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
