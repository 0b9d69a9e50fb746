"""What the decode stage measures and how, shared by its one-device half (:mod:`.decode`) and
its tensor-parallel half (:mod:`.decode_tp`): the bytes a token must read, one timed
generation loop on a fresh ``nrt.LLM``, and how the tokens were picked, in words."""

from __future__ import annotations

import dataclasses
import time

# Options the timed loop reads (the decode stage and its tensor-parallel half declare them).
OPTIONS = frozenset({"prompt_tokens", "new_tokens", "runs"})
# Positions the runner is asked for past prompt + new tokens: slack only (the loop writes
# prompt + new - 1 of them: the last id sampled is never fed back).
CONTEXT_SLACK = 16
MIN_NEW_TOKENS = 2  # a time per token is the interval from the first id to the last: two at least


def decode_context(prompt_tokens: int, new_tokens: int) -> int:
    """The ``max_context`` :func:`time_generation` asks ``nrt.LLM`` for. ``LLM`` caps it at the
    model's context without a word (:func:`nexusrt.engine.fit.runner_context`: it is a cap, not a
    demand), so a run past the context would load, generate up to the cap and then fail:
    :func:`check_fits` refuses it first."""
    return prompt_tokens + new_tokens + CONTEXT_SLACK


def check_fits(cfg, backend: str, model: str, prompt_tokens: int, new_tokens: int) -> int:
    """Refuse, before anything loads, ``--prompt-tokens`` + ``--new-tokens`` past the context the
    runner of ``backend`` gets for ``model`` (``cfg``) when asked for :func:`decode_context`;
    returns that context."""
    from .common import check_context

    return check_context(cfg, backend, model, prompt_tokens + new_tokens, decode_context(prompt_tokens, new_tokens),
                         f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens}")


def bytes_per_token(cfg, context: float, tensor_parallel: int = 1, elem: int = 2) -> dict:
    """Bytes one decode token must read on one rank of ``tensor_parallel`` (1: the whole model on
    one device): its weights once and its K,V up to ``context``. ``elem``: bytes of a weight or
    KV element (2: the CUDA runner's bf16; 4: the CPU runner's fp32); norms are fp32.

    A rank holds ``1/N`` of the query heads, KV heads, MLP width and LM-head rows
    (:class:`~nexusrt.parallel.ShardPlan`), so its share is about the weights ÷ N plus its own
    KV heads; the norms and the one embedding row it reads are replicated, read whole."""
    n = tensor_parallel
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    hq, hkv = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
    inter = cfg.intermediate_size // n
    per_layer = ((hq + 2 * hkv) * d * h + h * hq * d + 2 * inter * h + h * inter) * elem + 2 * h * 4
    weights = L * per_layer + cfg.vocab_size // n * h * elem + h * 4 + h * elem  # lm head, final norm, embed row
    kv = 2 * L * hkv * d * elem * context
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


def time_generation(model, prompt, args, label: str, inspect=None, versus_greedy: bool = False, **llm_kwargs):
    """(config, per-run figures, load seconds, host launch seconds) of ``args.runs`` generations
    (``args.sampling``: greedy unless --temperature) after one warm-up, on a fresh
    ``nrt.LLM(model, **llm_kwargs)`` (so the runner the environment selects now is the one
    built). ``inspect(llm)`` runs after the timed runs, before the LLM is closed (the
    tensor-parallel half times the collectives there). ``label`` names the run in errors.

    ``versus_greedy``: each run (and the warm-up) also generates greedily on the same LLM, the
    two in alternating order, and its figures gain ``greedy_ms_per_token``: a sampled token's
    extra cost measured pairwise, free of the drift between processes and calls."""
    from ..engine.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(model, max_context=decode_context(args.prompt_tokens, args.new_tokens), **llm_kwargs)
    load_s = time.perf_counter() - t0
    picks = {"asked": args.sampling}
    if versus_greedy:
        picks["greedy"] = dataclasses.replace(args.sampling, temperature=0.0)
    runs = []
    try:
        for r in range(args.runs + 1):  # the first is the warm-up
            order = list(picks) if r % 2 == 0 else list(reversed(picks))
            figures = {name: _generate(llm, prompt, args.new_tokens, picks[name], label) for name in order}
            if r:
                ttft, ms = figures["asked"]
                run = {"ttft_s": ttft, "ms_per_token": ms}
                if versus_greedy:
                    run["greedy_ms_per_token"] = figures["greedy"][1]
                runs.append(run)
        if inspect is not None:
            inspect(llm)
        return llm.config, runs, load_s, getattr(llm.runner, "timings", {}).get("host_launch_s")
    finally:
        llm.close()


def _generate(llm, prompt, new_tokens: int, params, label: str) -> tuple[float, float]:
    """(seconds to the first token, ms per later token) of one generation of ``new_tokens``."""
    stamps = []

    def on_token(_tok):
        stamps.append(time.perf_counter())
        return False

    start = time.perf_counter()
    n = llm.runner.generate_tokens(prompt, new_tokens, params, on_token)
    if n != new_tokens:
        raise RuntimeError(f"{label}: generated {n} of {new_tokens} tokens")
    return stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, n - 1) * 1e3


def pick_text(sampling: dict | None) -> str:
    """How each token was picked, in words (greedy when the result names no sampling)."""
    if not sampling or not sampling["temperature"]:
        return "greedy"
    return (f"sampled: temperature {sampling['temperature']}, top-k {sampling['top_k'] or 'none (1024 cap)'}, "
            f"top-p {sampling['top_p']}, seed {sampling['seed']}")
