"""A NumPy interpreter of a lowered :class:`~.lower.Program`: the proof that the lowering is right.

It simulates ``num_sms`` SMs, each advancing its own instruction list only when the head
instruction's waits are met, and picks which ready SM runs next from a seeded random
generator, so one program is run in many interleavings. Each tile is computed with the
:mod:`nexusrt.reference.ops` functions on the model's fp32 weights over a paged KV cache
(:mod:`nexusrt.kvcache.blocks` layout). Activation buffers start every step filled with NaN,
so a tile that reads data no instruction has written yet (a missing wait) poisons the logits
instead of quietly reading an old value. When no SM can advance before all lists are done,
:class:`DeadlockError` says which instruction each SM is stuck on and which wait is unmet.

The sampler's instructions follow the :class:`~nexusrt.reference.sampling.SamplingParams` of
the step (the struct the kernel reads) and the step index of the draw: greedy, argmax partials
and their combine, the gathers doing nothing and running without waiting (the kernel skips a
gather's waits in a greedy step); temperature > 0, the grid-wide top-K of :mod:`.topk`
(partials add their chunk's key histogram, gathers compact candidates into the pool, the
finish draws from it), whose pick is :func:`nexusrt.reference.sampling.sample`'s (tested).
A missing wait raises :class:`UnwrittenReadError` when a sampled step's partial or gather
finds an unwritten (NaN) logit in its chunk, a gather finds a histogram that not every partial
has added to, or the finish finds a pool that not every gather has written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....kvcache.blocks import BLOCK_SIZE, gather_tokens
from ....models.weights import WeightSource
from ....reference import ops
from ....reference.sampling import SamplingParams
from .instructions import Instruction, Op
from .topk import GridTopK

F32 = np.float32


class DeadlockError(RuntimeError):
    """No SM can advance and some instructions have not run."""


class UnwrittenReadError(RuntimeError):
    """An instruction read data that no instruction of the step had written yet."""


@dataclass
class StepResult:
    """What one interpreted step produced: fp32 ``logits [vocab]``, the picked ``token`` (None
    without sampler instructions) and ``trace``, the ``(sm, instruction index)`` run order."""

    logits: np.ndarray
    token: int | None
    trace: list[tuple[int, int]]


def waits_met(ins: Instruction, counters, sampling: SamplingParams) -> bool:
    """Whether ``ins`` may run: every wait met, except that a greedy step's gathers skip their
    waits (``waits_apply`` of ``persistent_decode.cuh``: they do nothing then)."""
    if ins.op == Op.SAMPLE_GATHER and sampling.greedy:
        return True
    return all(counters[c] >= t for c, t in ins.waits)


class _State:
    """The step's activation buffers, NaN until written."""

    def __init__(self, cfg, splits: int):
        hkv, g, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
        nan = lambda *shape: np.full(shape, np.nan, F32)  # noqa: E731
        self.x, self.qkv = nan(cfg.hidden_size), nan(cfg.q_size + 2 * cfg.kv_size)
        self.q, self.attn = nan(cfg.num_attention_heads, d), nan(cfg.q_size)
        self.part_m, self.part_l, self.part_acc = nan(hkv, splits, g), nan(hkv, splits, g), nan(hkv, splits, g, d)
        self.mlp, self.logits = nan(cfg.intermediate_size), nan(cfg.vocab_size)
        self.partials: dict[int, tuple[float, int]] = {}
        self.topk: GridTopK | None = None  # a sampled step's histogram and pool
        self.gathered = 0
        self.token: int | None = None


class Interpreter:
    """Runs a :class:`~.lower.Program` with the fp32 weights of a :class:`WeightSource`."""

    def __init__(self, program, weights: WeightSource):
        cfg = self.cfg = program.config
        if weights.config != cfg:
            raise ValueError("the weights' config is not the config the program was lowered for")
        self.program = program
        self.embed, self.final_norm = weights.load("embed"), weights.load("final_norm")
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights.load("lm_head")
        self.layers = [self._layer(weights, i) for i in range(cfg.num_hidden_layers)]
        self.inv_freq = ops.rope_inv_freq(cfg)

    @staticmethod
    def _layer(w: WeightSource, i: int) -> dict:
        cfg, p = w.config, f"layers.{i}."
        return {"attn_norm": w.load(p + "attn_norm"), "qkv": w.fused(i, "qkv"),
                "qkv_bias": w.fused(i, "qkv_bias") if cfg.attention_bias else None,
                "q_norm": w.load(p + "q_norm") if cfg.qk_norm else None,
                "k_norm": w.load(p + "k_norm") if cfg.qk_norm else None,
                "o": w.load(p + "o"), "mlp_norm": w.load(p + "mlp_norm"), "gate_up": w.fused(i, "gate_up"),
                "down": w.load(p + "down")}

    def step(self, token: int, pos: int, k_pools, v_pools, table, seed: int = 0,
             sampling: SamplingParams | None = None, draw_step: int = 0) -> StepResult:
        """Decode ``token`` at position ``pos`` (slots ``0..pos-1`` of the pools, through ``table``,
        hold the tokens before it; its K and V are written to slot ``pos``) in the interleaving
        of ``seed``, picking the next token by ``sampling`` (default greedy) as the
        ``draw_step``-th generated token. Raises :class:`DeadlockError` when the SMs stop
        advancing early."""
        prog = self.program
        sampling = SamplingParams() if sampling is None else sampling
        if not sampling.greedy and sampling.seed is None:
            raise ValueError("a sampled step needs a concrete seed (SamplingParams.resolved())")
        if not 0 <= token < self.cfg.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {self.cfg.vocab_size}")
        if not 0 <= pos < len(table) * BLOCK_SIZE:
            raise ValueError(f"position {pos} lies outside the {len(table)} blocks of the table")
        st = _State(self.cfg, prog.attn_splits)
        if not sampling.greedy:
            st.topk = GridTopK(self.cfg.vocab_size, sampling)
        ctx = (token, pos, k_pools, v_pools, np.asarray(table), sampling, draw_step)
        counters = [0] * len(prog.counters)
        pcs = [0] * prog.num_sms
        rng = np.random.default_rng(seed)
        trace = []
        while True:
            ready = [s for s in range(prog.num_sms) if pcs[s] < len(prog.lists[s])
                     and waits_met(prog.instructions[prog.lists[s][pcs[s]]], counters, sampling)]
            if not ready:
                if any(pcs[s] < len(prog.lists[s]) for s in range(prog.num_sms)):
                    raise DeadlockError(self._stuck(pcs, counters))
                break
            s = ready[int(rng.integers(len(ready)))]
            idx = prog.lists[s][pcs[s]]
            ins = prog.instructions[idx]
            self._run(ins, st, ctx)
            if ins.signal >= 0:  # the release: the tile's results are written before the count rises
                counters[ins.signal] += 1
            pcs[s] += 1
            trace.append((s, idx))
        return StepResult(st.logits.copy(), st.token, trace)

    def _stuck(self, pcs, counters) -> str:
        prog, lines = self.program, []
        for s, li in enumerate(prog.lists):
            if pcs[s] < len(li):
                ins = prog.instructions[li[pcs[s]]]
                unmet = ", ".join(f"{prog.counters[c].name} at {counters[c]} < {t}"
                                  for c, t in ins.waits if counters[c] < t)
                lines.append(f"SM {s} at instruction {li[pcs[s]]} ({ins.op.name} layer {ins.layer} "
                             f"{ins.start}..{ins.end}) waits for {unmet}")
        return f"deadlock: no SM can advance; {len(lines)} stuck:\n  " + "\n  ".join(lines[:8])

    # -- the tiles ---------------------------------------------------------------------------
    def _run(self, ins: Instruction, st: _State, ctx) -> None:
        cfg, op, a, b = self.cfg, ins.op, ins.start, ins.end
        eps = cfg.rms_norm_eps
        lw = self.layers[ins.layer] if op not in (Op.EMBED, Op.LM_HEAD) else None
        if op == Op.EMBED:
            st.x[:] = ops.embedding(np.asarray([ctx[0]]), self.embed)[0]
        elif op == Op.QKV:
            bias = None if lw["qkv_bias"] is None else lw["qkv_bias"][a:b]
            st.qkv[a:b] = ops.linear_epilogue(lw["qkv"][a:b], st.x[None], bias=bias, norm_weight=lw["attn_norm"],
                                              eps=eps)[0]
        elif op == Op.ROPE_APPEND:
            for kv in range(a, b):
                self._rope_append(ins.layer, kv, st, ctx)
        elif op == Op.ATTENTION:
            for kv in range(a, b):
                self._attention(ins, kv, st, ctx)
        elif op == Op.ATTN_COMBINE:
            for kv in range(a, b):
                self._combine(kv, st)
        elif op == Op.O_PROJ:
            st.x[a:b] = ops.linear_epilogue(lw["o"][a:b], st.attn[None], residual=st.x[None, a:b])[0]
        elif op == Op.GATE_UP:
            inter = cfg.intermediate_size
            w = np.concatenate([lw["gate_up"][a:b], lw["gate_up"][inter + a:inter + b]])
            st.mlp[a:b] = ops.linear_epilogue(w, st.x[None], norm_weight=lw["mlp_norm"], eps=eps, gate_up=True)[0]
        elif op == Op.DOWN:
            st.x[a:b] = ops.linear_epilogue(lw["down"][a:b], st.mlp[None], residual=st.x[None, a:b])[0]
        elif op == Op.LM_HEAD:
            st.logits[a:b] = ops.linear_epilogue(self.lm_head[a:b], st.x[None], norm_weight=self.final_norm,
                                                 eps=eps)[0]
        elif op == Op.SAMPLE_PARTIAL:
            if ctx[5].greedy:  # np.argmax: the lowest index among equal maxima
                i = a + int(np.argmax(st.logits[a:b]))
                st.partials[ins.arg] = (float(st.logits[i]), i)
            else:
                st.topk.partial(self._written(st.logits, a, b, "partial"), a, b)
        elif op == Op.SAMPLE_GATHER:
            if not ctx[5].greedy:
                if st.topk.hist.sum() != self.cfg.vocab_size:
                    raise UnwrittenReadError(f"a sampling gather read a histogram of {int(st.topk.hist.sum())} of "
                                             f"{self.cfg.vocab_size} logits: a wait is missing")
                st.topk.gather(self._written(st.logits, a, b, "gather"), a, b)
                st.gathered += 1
        elif op == Op.SAMPLE_FINISH:
            params, draw_step = ctx[5], ctx[6]
            if params.greedy:
                # Largest value, lowest index on ties: what one argmax over all logits picks.
                best = sorted(st.partials[c] for c in range(ins.arg))
                st.token = min((i for v, i in best if v == best[-1][0]), default=None)
            else:
                if st.gathered != ins.arg:  # one gather per chunk: the finish's arg counts them
                    raise UnwrittenReadError(f"the sampling finish read the pool after {st.gathered} of {ins.arg} "
                                             "gathers: a wait is missing")
                st.token = st.topk.finish(self._written(st.logits, 0, self.cfg.vocab_size, "finish"), draw_step)
        else:
            raise ValueError(f"the interpreter has no meaning for {op!r}")

    @staticmethod
    def _written(logits: np.ndarray, a: int, b: int, who: str) -> np.ndarray:
        """``logits``, after checking that every logit in [a, b) a sampled step's ``who`` reads
        was written (an unwritten one is still the NaN the step started with)."""
        unwritten = int(np.isnan(logits[a:b]).sum())
        if unwritten:
            raise UnwrittenReadError(f"a sampling {who} read {unwritten} logits of {a}..{b} no LM-head tile had "
                                     "written: a wait is missing")
        return logits

    def _rope_append(self, layer: int, kv: int, st: _State, ctx) -> None:
        cfg, lw = self.cfg, self.layers[layer]
        _, pos, k_pools, v_pools, table = ctx[:5]
        d, g, hq = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.num_attention_heads
        q = st.qkv[kv * g * d:(kv + 1) * g * d].reshape(1, g, d)
        k = st.qkv[hq * d + kv * d:hq * d + (kv + 1) * d].reshape(1, 1, d)
        v = st.qkv[cfg.q_size + cfg.kv_size + kv * d:cfg.q_size + cfg.kv_size + (kv + 1) * d]
        if cfg.qk_norm:
            q, k = ops.rms_norm(q, lw["q_norm"], cfg.rms_norm_eps), ops.rms_norm(k, lw["k_norm"], cfg.rms_norm_eps)
        st.q[kv * g:(kv + 1) * g] = ops.apply_rope(q, np.asarray([pos]), self.inv_freq)[0]
        blk, slot = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
        k_pools[layer][blk, kv, slot] = ops.apply_rope(k, np.asarray([pos]), self.inv_freq)[0, 0]
        v_pools[layer][blk, kv, slot] = v

    def _keys(self, layer: int, kv: int, ctx) -> tuple[np.ndarray, np.ndarray]:
        """K and V ``[S, 1, D]`` of KV head ``kv`` that the query at ``pos`` sees."""
        _, pos, k_pools, v_pools, table = ctx[:5]
        lo = 0 if self.cfg.sliding_window is None else max(0, pos - self.cfg.sliding_window + 1)
        k = gather_tokens(k_pools[layer], table, pos + 1)[lo:, kv:kv + 1]
        v = gather_tokens(v_pools[layer], table, pos + 1)[lo:, kv:kv + 1]
        return k, v

    def _attention(self, ins: Instruction, kv: int, st: _State, ctx) -> None:
        cfg, splits = self.cfg, self.program.attn_splits
        d, g = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = self._keys(ins.layer, kv, ctx)
        q = st.q[kv * g:(kv + 1) * g]
        if splits == 1:
            out = ops.attention(q[None], k, v, np.asarray([k.shape[0] - 1]))
            st.attn[kv * g * d:(kv + 1) * g * d] = out.reshape(-1)
            return
        # One part of the KV length (the split-KV "flash decoding" partial): its running max,
        # its sum of exponentials and its unnormalised output; an empty part has max -inf.
        chunk = -(-k.shape[0] // splits)
        ks, vs = k[ins.arg * chunk:(ins.arg + 1) * chunk, 0], v[ins.arg * chunk:(ins.arg + 1) * chunk, 0]
        scores = (q @ ks.T).astype(F32) * F32(1.0 / math.sqrt(d))  # [g, n]
        m = scores.max(axis=1) if ks.shape[0] else np.full(g, -np.inf, F32)
        e = np.exp(scores - m[:, None]) if ks.shape[0] else np.zeros((g, 0), F32)
        st.part_m[kv, ins.arg], st.part_l[kv, ins.arg] = m, e.sum(axis=1, dtype=F32)
        st.part_acc[kv, ins.arg] = (e @ vs).astype(F32)

    def _combine(self, kv: int, st: _State) -> None:
        g, d = self.cfg.num_attention_heads // self.cfg.num_key_value_heads, self.cfg.head_dim
        m = st.part_m[kv]  # [splits, g]
        top = m.max(axis=0)
        scale = np.where(np.isneginf(m), F32(0), np.exp(m - top)).astype(F32)
        num = (scale[:, :, None] * st.part_acc[kv]).sum(axis=0, dtype=F32)
        den = (scale * st.part_l[kv]).sum(axis=0, dtype=F32)
        st.attn[kv * g * d:(kv + 1) * g * d] = (num / den[:, None]).reshape(-1)
