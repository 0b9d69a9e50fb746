"""PyTorch peers for the decode benchmark: the same model shape, decoded by PyTorch.

A plain static-KV-cache Llama-family decode step written with torch ops (RMSNorm, fused
QKV, RoPE, SDPA over the static cache with GQA, SiLU MLP, LM head, argmax), run eager and
under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), as the usual PyTorch
serving loops do. Random bf16 weights of the same shapes: the work, not the values, is
what is timed. Imported only when torch with CUDA is available.
"""

from __future__ import annotations

import statistics
import time


def _build(cfg, max_len: int, dev: str = "cuda"):
    import torch

    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, inter, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.num_hidden_layers

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dt)

    w = {
        "embed": rnd(cfg.vocab_size, h),
        "norm": torch.ones(h, device=dev, dtype=dt),
        "layers": [dict(qkv=rnd((hq + 2 * hkv) * d, h), o=rnd(h, hq * d), gate_up=rnd(2 * inter, h),
                        down=rnd(h, inter), n1=torch.ones(h, device=dev, dtype=dt),
                        n2=torch.ones(h, device=dev, dtype=dt)) for _ in range(L)],
    }
    w["lm_head"] = w["embed"] if cfg.tie_word_embeddings else rnd(cfg.vocab_size, h)
    kc = torch.zeros(L, 1, hkv, max_len, d, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    return w, kc, vc, inv


def _make_step(cfg, w, kc, vc, inv):
    """The decode step as an nn.Module: the KV caches are registered buffers, so
    ``torch.compile(mode="reduce-overhead")`` may update them in place inside its CUDA graph
    (a mutated plain input would make it skip graphs)."""
    import torch
    import torch.nn.functional as F

    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, inter, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.rms_norm_eps
    max_len = kc.shape[3]

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kc", kc)
            self.register_buffer("vc", vc)
            self.register_buffer("inv", inv)
            self.register_buffer("embed", w["embed"])
            self.register_buffer("lm_head", w["lm_head"])
            self.register_buffer("norm", w["norm"])
            for li, lw in enumerate(w["layers"]):
                for k, v in lw.items():
                    self.register_buffer(f"l{li}_{k}", v)

        def rms(self, x, wt):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * wt

        def rope(self, x, pos):
            f = pos.float() * self.inv
            cos, sin = torch.cat([f.cos(), f.cos()]).to(x.dtype), torch.cat([f.sin(), f.sin()]).to(x.dtype)
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        def forward(self, token, pos):
            """token: int64 [1]; pos: int64 [1] (a tensor, so one graph serves every position)."""
            x = self.embed[token].view(1, 1, h)
            mask = (torch.arange(max_len, device=token.device) <= pos).view(1, 1, 1, max_len)
            for li in range(cfg.num_hidden_layers):
                lw = {k: getattr(self, f"l{li}_{k}") for k in ("qkv", "o", "gate_up", "down", "n1", "n2")}
                qkv = self.rms(x, lw["n1"]) @ lw["qkv"].t()
                q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
                q = self.rope(q.view(1, 1, hq, d), pos).transpose(1, 2)
                k = self.rope(k.view(1, 1, hkv, d), pos).transpose(1, 2)
                self.kc[li].index_copy_(2, pos, k)
                self.vc[li].index_copy_(2, pos, v.view(1, 1, hkv, d).transpose(1, 2))
                a = F.scaled_dot_product_attention(q, self.kc[li], self.vc[li], attn_mask=mask, enable_gqa=True)
                x = x + a.transpose(1, 2).reshape(1, 1, hq * d) @ lw["o"].t()
                gu = self.rms(x, lw["n2"]) @ lw["gate_up"].t()
                x = x + (F.silu(gu[..., :inter]) * gu[..., inter:]) @ lw["down"].t()
            logits = self.rms(x, self.norm) @ self.lm_head.t()
            return logits.view(-1).argmax().view(1)

    return Step()


def measure(cfg, prompt_len: int, new_tokens: int, runs: int, modes=("eager", "compile")) -> dict:
    """ms per decode token (median over ``runs``) for each PyTorch mode; errors are reported, not raised."""
    import torch

    out = {}
    max_len = prompt_len + new_tokens + 1
    w, kc, vc, inv = _build(cfg, max_len)
    for mode in modes:
        try:
            step = _make_step(cfg, w, kc, vc, inv)
            if mode == "compile":
                step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            times = []
            for r in range(runs + 2):  # two warm-ups (compile and graph capture happen there)
                tok = torch.zeros(1, dtype=torch.long, device="cuda")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(new_tokens):
                    pos = torch.full((1,), prompt_len + i, dtype=torch.long, device="cuda")
                    tok = step(tok, pos).clone()
                torch.cuda.synchronize()
                if r >= 2:
                    times.append((time.perf_counter() - t0) / new_tokens * 1e3)
            out[mode] = {"ms_per_token": statistics.median(times), "runs_ms": times}
        except Exception as exc:  # a peer that cannot run is reported, the benchmark goes on
            out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    del w, kc, vc
    torch.cuda.empty_cache()
    return out
