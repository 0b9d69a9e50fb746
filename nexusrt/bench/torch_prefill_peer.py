"""PyTorch peers for the prefill benchmark, run in the same process on the same card.

- HF transformers' Llama model of the same shape (random bf16 weights, ``sdpa`` attention,
  eager): time to first token of a prompt = one forward that keeps the last row's logits,
  then the argmax read on the host, as a user of ``model.generate`` waits for it.
- ``torch.nn.functional.scaled_dot_product_attention`` with the flash backend on a causal
  prompt (K/V expanded to every query head first, as HF's sdpa path does).

Imported only when torch with CUDA is available; failures are reported, not raised.
"""

from __future__ import annotations

import statistics
import time


def _hf_model(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=max(cfg.max_position_embeddings, 8192), tie_word_embeddings=cfg.tie_word_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    return model.eval()


def hf_prefill_ms(cfg, lengths, runs: int) -> dict:
    """{length: {"ttft_ms", "runs_ms"} or {"error"}} for HF eager prefill of each length."""
    import torch

    out = {}
    try:
        model = _hf_model(cfg)
    except Exception as exc:  # transformers missing, or the shape does not fit
        return {n: {"error": f"{type(exc).__name__}: {exc}"[:200]} for n in lengths}
    try:
        for n in lengths:
            try:
                ids = (torch.arange(n, device="cuda") * 7919 + 11) % cfg.vocab_size
                ids = ids.view(1, n)
                times = []
                with torch.inference_mode():
                    for r in range(runs + 1):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        logits = model(input_ids=ids, logits_to_keep=1).logits
                        int(logits[0, -1].argmax())  # the host has the first token
                        if r:
                            times.append((time.perf_counter() - t0) * 1e3)
                out[n] = {"ttft_ms": statistics.median(times), "runs_ms": times}
            except Exception as exc:
                out[n] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    finally:
        del model
        torch.cuda.empty_cache()
    return out


def sdpa_ms(tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, runs: int) -> dict:
    """Median ms of causal SDPA (flash backend) over ``tokens`` rows: {"ms", "runs_ms"} or {"error"}."""
    import torch
    import torch.nn.functional as F

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = torch.Generator(device="cuda").manual_seed(head_dim)
        q = torch.randn(1, num_q_heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        rep = num_q_heads // num_kv_heads
        k, v = (torch.randn(1, num_kv_heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                .repeat_interleave(rep, dim=1) for _ in range(2))
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.inference_mode():
            for r in range(runs + 2):
                start.record()
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                stop.record()
                stop.synchronize()
                if r >= 2:
                    times.append(start.elapsed_time(stop))
        del q, k, v
        torch.cuda.empty_cache()
        return {"ms": statistics.median(times), "runs_ms": times}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
