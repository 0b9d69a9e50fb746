"""KV pruning options of ``nrt.LLM`` calls (``kv_policy``, ``kv_budget``, ``kv_sinks``,
``kv_window``, ``kv_protect``) checked into a :class:`~nexusrt.serving.pruning.KvPolicy`, and
the ``kv`` report of a result.

``kv_protect`` names layers of an :class:`~nexusrt.engine.context.Context` prompt whose
tokens are never evicted; it protects the rendered prompt from its start through the last
named layer (layers render in order, so protecting ``instructions`` protects ``system`` and
``persona`` too). The protected length is the ids the full prompt shares with the prompt
rendered from those layers alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InvalidArgument, InvalidArgumentType
from ..kvcache.blocks import blocks_for
from ..kvcache.fault_plan import FaultCounts
from ..serving.pruning import DEFAULT_SINKS, KvPolicy
from .context import LAYERS, Rendered, render

OPTIONS = ("kv_policy", "kv_budget", "kv_sinks", "kv_window", "kv_protect")
HOST_TIER = "off: every KV block is on the device (kv_gpu_budget puts the oldest past it on the host)"


@dataclass(frozen=True)
class Pruned:
    """A shaped prompt (text, messages or a rendered Context) that runs under a pruning policy."""

    prompt: object
    policy: KvPolicy


def _encode(tokenizer, prompt) -> list[int]:
    return tokenizer.encode_chat(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)


def protected_length(rendered: Rendered, layers, tokenizer) -> int:
    """Leading ids of ``rendered`` that belong to the layers up to the last of ``layers``."""
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise InvalidArgument("kv_protect", f"kv_protect names unknown context layer {unknown[0]!r} "
                                            f"(layers: {', '.join(LAYERS)})")
    last = max(LAYERS.index(name) for name in layers)
    ctx = rendered.context
    head = {name: getattr(ctx, name) for name in LAYERS[:last + 1]}
    if not any(head.values()):
        return 0
    sub = render(replace(ctx, **{n: "" for n in LAYERS[last + 1:]}, **head), tokenizer)
    full, part = _encode(tokenizer, rendered.prompt), _encode(tokenizer, sub.prompt)
    n = 0
    while n < min(len(full), len(part)) and full[n] == part[n]:
        n += 1
    return n


def shape(prompt, options: dict, tokenizer):
    """``prompt`` (already shaped by ``prompt_for``) wrapped in :class:`Pruned` when ``options``
    choose a pruning policy; bad options raise before any work."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (KV options: {', '.join(OPTIONS)})")
    policy = options.get("kv_policy")
    policy = "full" if policy is None else policy  # anything else KvPolicy checks by name
    stray = [k for k in ("kv_budget", "kv_sinks", "kv_window", "kv_protect") if options.get(k) is not None]
    if policy == "full" and stray:  # they would be ignored: every token is kept
        raise InvalidArgument(stray[0], f"{stray[0]} applies to a pruning policy, and kv_policy is 'full' (the "
                                        "default: every token is kept); pass kv_policy='sink-window' or 'h2o' with it")
    protect = options.get("kv_protect") or ()
    if isinstance(protect, str):
        protect = (protect,)
    if not isinstance(protect, (list, tuple)) or not all(isinstance(name, str) for name in protect):
        raise InvalidArgumentType("kv_protect", "kv_protect must be a context layer's name or a list of them, "
                                                f"got {protect!r:.60}")
    ranges = ()
    if protect:
        if not isinstance(prompt, Rendered):
            raise InvalidArgument("kv_protect", "kv_protect names context layers: the prompt must be an nrt.Context")
        ranges = ((0, protected_length(prompt, protect, tokenizer)),)
    sinks = options.get("kv_sinks")
    kv = KvPolicy(policy, options.get("kv_budget"), DEFAULT_SINKS if sinks is None else sinks,
                  options.get("kv_window"), ranges)
    return Pruned(prompt, kv) if kv.prunes else prompt


def report(policy: KvPolicy, kept: int, evicted: int, blocks: int, tiers: dict | None = None,
           preemptions: int = 0, swaps: int = 0) -> dict:
    """The ``kv`` object of a result (``nexusrt generate --json``). ``preemptions``: times the
    serving engine preempted the request for lack of blocks, ``swaps`` of them by swap to its
    host tier (the rest recomputed; both 0 on the one-sequence path). ``tiers`` (a runner's
    ``kv_tiers()``) gives the blocks on the device and on the host tier; without it every block
    counts as on the device. The fault figures (posted by decode attention, serviced = blocks moved
    into HBM, overflow = posts a full ring refused, left = drained but not moved, bytes moved; see
    :class:`~nexusrt.kvcache.fault_plan.FaultCounts`) are the runner's since it was made;
    they stay 0 without a fault ring (``kv_fault_reserve``): zero-copy reads move no pages."""
    out = {"policy": policy.policy, "budget": policy.budget, "sinks": policy.sinks if policy.prunes else None,
           "window": policy.recent if policy.prunes else None,
           "protected_tokens": sum(hi - lo for lo, hi in policy.protect),
           "tokens_kept": kept, "tokens_evicted": evicted, "blocks_used": blocks,
           "preemptions": preemptions, "preemptions_swapped": swaps,
           "host_tier": HOST_TIER, "blocks_device": blocks, "blocks_host": 0, "pages_host": 0,
           **FaultCounts().report()}
    if tiers and tiers.get("blocks_host"):
        moved = (f"; decode moves the ones it reads into {tiers['blocks_reserve']} reserve device blocks"
                 if tiers.get("blocks_reserve") else "")
        out.update(host_tier=f"{tiers['host_mode']}: the oldest {tiers['blocks_host']} blocks of the sequence "
                             f"are placed in pinned host memory{moved}", blocks_device=tiers["blocks_device"],
                   blocks_host=tiers["blocks_host"], pages_host=tiers["blocks_host"],
                   **{k: tiers[k] for k in FaultCounts.KEYS})
    return out


def one_sequence_report(prompt_tokens: int, generated: int, tiers: dict | None = None) -> dict:
    """The ``kv`` object of the one-sequence path (policy ``full``): every computed id is kept.
    With a host tier the runner's blocks (sized for its whole context) are reported as placed."""
    kept = prompt_tokens + max(generated - 1, 0)  # the last id sampled is never run
    return report(KvPolicy(), kept, 0, blocks_for(kept), tiers)
