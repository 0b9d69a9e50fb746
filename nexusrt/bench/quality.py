"""``nexusrt-bench --stage quality``: held-out perplexity of a model as NexusRT runs it.

The text and the windows are :mod:`nexusrt.models.quality`'s (stdlib modules no shipped
model trained on). When torch and transformers import, HF transformers scores the same
tokens in the same windows on the same device: fp32 always, and bf16 too on a GPU, so a
NexusRT figure can be read against HF's own precision loss. Without ``--model`` it measures
``nexusrt:stdlib-tiny``; a synthetic model named explicitly runs as asked (random weights: a
figure near chance, with no checkpoint for HF to load).
"""

from __future__ import annotations

import sys
import time

from ..cli.parsing import int_range
from .common import add_model_argument, resolve_model_config
from .table import plain, table

# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "tokens", "window", "no_hf"})


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--tokens", type=int, default=None, metavar="N",
                        help="quality, kv stages: score at most N held-out tokens (default: all; kv: 4 windows)")
    parser.add_argument("--window", type=int_range(2), default=None, metavar="W",
                        help="quality stage: tokens per teacher-forced window, >= 2 (default 512; at most the "
                             "model's context, which a longer one is cut to, said on stderr)")
    parser.add_argument("--no-hf", action="store_true", help="quality stage: skip the HF transformers comparison")


def run(args) -> dict:
    from .. import firmware
    from ..engine.llm import LLM
    from ..models import quality
    from ..models.shipped import DEFAULT_MODEL

    # `is None`, not `or`: --window 0 is an error (the parser says so), never the default
    window = quality.DEFAULT_WINDOW if args.window is None else args.window
    if window < 2 or (args.tokens is not None and args.tokens < 2):
        raise ValueError(f"--window and --tokens must be >= 2, got {args.window} and {args.tokens}")
    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    model = args.model if getattr(args, "model_explicit", False) else DEFAULT_MODEL
    resolve_model_config(model)  # an unknown name fails here with the list of models
    synthetic = model.startswith("synthetic:")
    note = f"{model} has random weights: a figure near chance, not a quality" if synthetic else ""
    t0 = time.perf_counter()
    llm = LLM(model, max_context=window)
    try:
        window = _fit_window(window, args.window, model, llm.runner.max_context)
        ids = quality.heldout_tokens(llm.model.tokenizer, quality.heldout_documents(), args.tokens)
        t1 = time.perf_counter()
        ours = quality.perplexity(llm.runner.forward_all, ids, window)
        seconds = time.perf_counter() - t1
        model_dir = llm.model.path
    finally:
        llm.close()
    result = {"backend": rt.backend, "device": rt.profile.device_name, "model": model, "note": note,
              "load_s": t1 - t0, "seconds": seconds, **ours.to_dict()}
    if synthetic:
        result["hf"] = {"skipped": "synthetic weights: no checkpoint for HF transformers"}
    elif not args.no_hf:
        result["hf"] = _hf(model_dir, ids, window, "cuda" if rt.is_cuda else "cpu", ours.perplexity)
    return result


def _fit_window(window: int, asked: int | None, model: str, context: int) -> int:
    """``window`` cut to the model's ``context``: a model with a shorter context scores shorter
    windows. Said on stderr when the user ``asked`` for the longer one (the default is not theirs)."""
    if window <= context:
        return window
    if asked is not None:
        print(f"nexusrt-bench: --window {asked} is longer than {model}'s context of {context} tokens: "
              f"scoring windows of {context}", file=sys.stderr)
    return context


def _hf(model_dir, ids, window: int, device: str, ours: float) -> dict:
    """HF transformers' perplexity on the same ids and windows, per dtype (or why it was skipped)."""
    try:
        import torch
        import transformers
    except Exception as exc:  # optional peer: torch/transformers are test-only dependencies
        return {"skipped": f"torch/transformers not importable: {exc}"}
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA here"}
    from ..models import quality

    out = {}
    for dtype in (("float32", "bfloat16") if device == "cuda" else ("float32",)):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager").to(device).eval()

        def forward_all(chunk, model=model):
            with torch.no_grad():
                x = torch.tensor(chunk[None].astype("int64"), device=device)
                return model(x).logits[0].float().cpu().numpy()

        p = quality.perplexity(forward_all, ids, window)
        out[dtype] = {**p.to_dict(), "nexusrt_over_hf": ours / p.perplexity}
        del model
    return out


def render(r: dict) -> str:
    rows = [["model", r["model"]], ["device", f"{r['device']} ({r['backend']})"],
            ["perplexity", f"{r['perplexity']:.4f}"],
            ["tokens scored", f"{r['tokens']} (windows of {r['window']})"],
            ["time", f"{r['seconds']:.2f} s ({r['tokens'] / max(r['seconds'], 1e-9):,.0f} tokens/s)"]]
    for dtype, h in (r.get("hf") or {}).items():
        if isinstance(h, dict):
            rows.append([f"HF {dtype}", f"{h['perplexity']:.4f} -> NexusRT / HF {h['nexusrt_over_hf']:.5f}"])
        else:
            rows.append([f"HF ({dtype})", plain(h)])
    if r.get("note"):
        rows.append(["note", r["note"]])
    return table(["quality", ""], rows, title="NexusRT held-out perplexity")
