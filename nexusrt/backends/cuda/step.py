"""The forward pass as scheduler stages: one decode step, or one prefill chunk.

Every stage is a kernel launch in stream order on the compute stream; a stage declares the
tensors it reads and writes, and depends on the one before it, so the task graph is the
same chain the token's path describes (ARCHITECTURE.md). Per-token values (token id, position)
live in device memory, which is what lets the decode chain be captured once and replayed.
"""

from __future__ import annotations

from types import SimpleNamespace

from ... import scheduler
from ...kernels.ops import attention_decode as attn_dec
from ...kernels.ops import attention_prefill as attn_pre
from ...kernels.ops import elementwise as ew
from ...kernels.ops import gemm as gm
from ...kernels.ops import gemv as gv
from ...kernels.ops import qkv_rope
from ...kernels.ops import rope
from ...kernels.ops import sampling


def close_graphs(stream, graphs: dict) -> None:
    """Wait for ``stream`` (a device fault there is ignored: release what we can), then close
    and forget every captured graph in ``graphs``."""
    try:
        stream.synchronize()
    except Exception:
        pass
    for g in graphs.values():
        g.close()
    graphs.clear()


def _residual(tp, x):
    """The residual a row-parallel product (O, down) adds: ``x`` on one device and on rank 0 of
    a tensor-parallel group, nothing on the other ranks (:mod:`.collectives`)."""
    return x if tp is None else tp.residual(x)


class _Chain:
    """Stages in order, each depending on the previous one."""

    def __init__(self, prefix: str):
        self.prefix, self.stages = prefix, []

    def add(self, name: str, spec, inputs=(), outputs=()) -> None:
        deps = (self.stages[-1].name,) if self.stages else ()
        self.stages.append(scheduler.stage(
            name=f"{self.prefix}.{name}", kernel=spec, inputs=[t for t in inputs if t is not None],
            outputs=list(outputs), depends_on=deps))

    def sum_partials(self, tp, name: str, x) -> None:
        """Under tensor parallelism, the all-reduce of ``x`` after the row-parallel product ``name``."""
        if tp is not None:
            self.add(f"{name}.all_reduce", tp.all_reduce(x), [x], [x])


def decode_stages(rt, cfg, w, b, *, sample: bool, meta=None, tp=None, fuse_rope: bool = False,
                  cluster: bool = False, mma: bool = False, wide: bool = False) -> list:
    """One token: embedding of ``b.token`` at ``b.pos`` through the LM head (and the sampler).

    ``meta`` (int32 ``[4]``: RoPE position, cache slot, 0, 0), for the serving runner's lone
    decode: RoPE/append by the rows kernel at ``meta``'s position and slot (over ``b.block_table``
    as a one-row table) instead of ``b.pos`` for both, so a KV-pruned sequence, whose position is
    past its slot count, keeps the GEMV step; attention still reads ``b.pos``, which then holds
    the slot. ``meta`` takes neither ``sample`` (the sampler would advance ``b.pos`` but not
    ``meta``) nor a host tier (the rows RoPE/append reads device blocks only): ValueError.

    ``tp`` (a :class:`~.collectives.RankComm`): ``cfg`` and ``w`` are a tensor-parallel rank's
    shard; an all-reduce follows O and down, and the LM head is vocab-parallel.

    ``fuse_rope``: each layer's QKV GEMV also applies RoPE and appends K/V (one stage,
    ``layer<i>.qkv_rope``) where :func:`~nexusrt.kernels.ops.qkv_rope.unfused_reason` allows it
    (not with ``meta``); the persistent kernel's lowering reads the unfused chain.

    ``cluster``: decode attention by the cluster kernels (sm_90, device blocks:
    :func:`~nexusrt.kernels.ops.attention_decode.cluster_ok`), faster up to
    :func:`~nexusrt.kernels.ops.attention_decode.cluster_context_limit` tokens and slower past it:
    the one-sequence runner captures a graph each way and replays by context.

    ``mma``: decode attention by the tensor-core kernels (sm_80+:
    :func:`~nexusrt.kernels.ops.attention_decode.mma_ok`) where ``cluster`` is off; a layer whose
    KV has a host tier takes their host twins, which copy a host block as a device one, so the
    tokens do not depend on where the blocks live.

    ``wide`` (with ``mma``): attention with the long-context split count, over ``b.attn_ws_wide``
    (:func:`~nexusrt.kernels.ops.attention_decode.wide_splits`); the one-sequence runner captures a
    graph each way and replays this one from ``MMA_WIDE_FROM`` tokens on."""
    if wide and (not mma or cluster or b.attn_ws_wide is None):
        raise ValueError("decode_stages(wide=True) needs the mma kernels (mma=True, cluster=False) and "
                         "buffers with a wide attention workspace (attn_wide_splits > 0)")
    if meta is not None and (sample or b.k_host_pools):
        raise ValueError("decode_stages(meta=...) is the serving runner's lone decode: no sampler (sample=False) "
                         "and no host KV tier")
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    x = b.hidden[0:1]
    q, attn, mlp = b.q[0:1], b.dec_attn, b.dec_mlp
    eps = cfg.rms_norm_eps
    ch = _Chain("decode")
    ch.add("embed", ew.embedding(rt, x, b.token, w.embed, m=1, hidden=h, vocab=cfg.vocab_size),
           [b.token, w.embed], [x])
    for i, lw in enumerate(w.layers):
        p = f"layer{i}"
        if fuse_rope and meta is None and qkv_rope.unfused_reason(
                hidden=h, head_dim=d, q_norm=lw.q_norm, k_norm=lw.k_norm, host_pools=b.host_pools(i)) is None:
            ch.add(f"{p}.qkv_rope", qkv_rope.qkv_rope(
                rt, q, b.k_pools[i], b.v_pools[i], b.block_table, b.pos, lw.qkv, x, w.inv_freq, num_q_heads=hq,
                num_kv_heads=hkv, head_dim=d, norm_weight=lw.attn_norm, eps=eps, bias=lw.qkv_bias,
                bias_dtype="fp32" if lw.qkv_bias is not None else None),
                [x, lw.qkv, lw.attn_norm, lw.qkv_bias, b.pos, b.block_table], [q, b.k_pools[i], b.v_pools[i]])
        else:
            _add_qkv_rope_unfused(ch, rt, cfg, w, b, i, meta)
        ch.add(f"{p}.attention", attn_dec.attention_decode(
            rt, q.reshape(hq, d), attn.reshape(hq * d), b.k_pools[i], b.v_pools[i], b.block_table, b.pos,
            b.attn_ws_wide if wide else b.attn_ws, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
            host_pools=b.host_pools(i),
            fault_ring=b.fault_ring, cluster=cluster and b.host_pools(i) is None,
            mma=mma and not cluster),
            [q, b.k_pools[i], b.v_pools[i]], [attn])
        ch.add(f"{p}.o", gv.gemv(rt, x, lw.o, attn, n=h, k=hq * d, residual=_residual(tp, x), workspace=b.gemv_ws),
               [attn, lw.o], [x])
        ch.sum_partials(tp, f"{p}.o", x)
        ch.add(f"{p}.gate_up", gv.gemv(rt, mlp, lw.gate_up, x, n=inter, k=h, norm_weight=lw.mlp_norm, eps=eps,
                                       gate_up=True, workspace=b.gemv_ws), [x, lw.gate_up, lw.mlp_norm], [mlp])
        ch.add(f"{p}.down", gv.gemv(rt, x, lw.down, mlp, n=h, k=inter, residual=_residual(tp, x),
                                    workspace=b.gemv_ws), [mlp, lw.down], [x])
        ch.sum_partials(tp, f"{p}.down", x)
    _add_lm_head(ch, rt, cfg, w, b, tp)
    if sample:
        ch.stages.extend(sample_stages(rt, b, after=ch.stages[-1].name))
    return ch.stages


def _add_qkv_rope_unfused(ch: _Chain, rt, cfg, w, b, i: int, meta) -> None:
    """Layer ``i``'s QKV GEMV into ``b.qkv``, then RoPE + KV append (``rope_append``) as two
    stages: every shape, the host tier and ``meta`` (see :func:`decode_stages`)."""
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    lw, p, x, qkv, q = w.layers[i], f"layer{i}", b.hidden[0:1], b.qkv[0:1], b.q[0:1]
    ch.add(f"{p}.qkv", gv.gemv(rt, qkv, lw.qkv, x, n=(hq + 2 * hkv) * d, k=h, norm_weight=lw.attn_norm,
                               eps=cfg.rms_norm_eps, bias=lw.qkv_bias,
                               bias_dtype="fp32" if lw.qkv_bias is not None else None, workspace=b.gemv_ws),
           [x, lw.qkv, lw.attn_norm, lw.qkv_bias], [qkv])
    # meta: the rows kernel over a one-row table, reading position and slot apart.
    table, where, how = ((b.block_table, b.pos, dict(host_pools=b.host_pools(i))) if meta is None else
                         (b.block_table.reshape(1, -1), meta.reshape(1, 4), dict(rows=True)))
    ch.add(f"{p}.rope_append", rope.rope_append(
        rt, qkv, q, b.k_pools[i], b.v_pools[i], table, where, w.inv_freq, num_q_heads=hq, num_kv_heads=hkv,
        head_dim=d, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=cfg.rms_norm_eps, **how),
        [qkv, b.pos if meta is None else meta, b.block_table], [q, b.k_pools[i], b.v_pools[i]])


def sample_stages(rt, b, after: str | None = None) -> list:
    """The three sampler launches (partial, gather, finish): next token into ``b.token`` and the
    ring; advances pos, step."""
    logits = b.logits.reshape(b.logits.shape[-1])
    part, gather, finish = sampling.sample(rt, logits, b.sampler, b.pos, b.step, b.token, b.ring, b.ring.shape[0])
    s1 = scheduler.stage(name="sample.partial", kernel=part, inputs=[b.logits], outputs=[],
                         depends_on=(after,) if after else ())
    s2 = scheduler.stage(name="sample.gather", kernel=gather, inputs=[b.logits], outputs=[],
                         depends_on=("sample.partial",))
    s3 = scheduler.stage(name="sample.finish", kernel=finish, inputs=[b.logits],
                         outputs=[b.token, b.state], depends_on=("sample.gather",))
    return [s1, s2, s3]


def _add_lm_head(ch: _Chain, rt, cfg, w, b, tp=None) -> None:
    """Final norm and LM-head GEMV of ``b.hidden[0]`` into ``b.logits``; under tensor
    parallelism into the rank's vocab slice of it, then the all-gather of every slice."""
    x = b.hidden[0:1]
    out = b.logits if tp is None else tp.vocab_slice(b.logits)
    ch.add("lm_head", gv.gemv(rt, out, w.lm_head, x, n=out.shape[-1], k=cfg.hidden_size,
                              norm_weight=w.final_norm, eps=cfg.rms_norm_eps, workspace=b.gemv_ws),
           [x, w.lm_head, w.final_norm], [out])
    if tp is not None:
        ch.add("lm_head.all_gather", tp.all_gather(out, b.logits), [out], [b.logits])


def logits_stages(rt, cfg, w, b, tp=None) -> list:
    """The LM head alone, the last stage of a decode step (after a prefill, the runner copies
    the prompt's last row to ``b.hidden[0]``)."""
    ch = _Chain("logits")
    _add_lm_head(ch, rt, cfg, w, b, tp)
    return ch.stages


def _tensor_core_layers(ch: _Chain, rt, cfg, w, r, m: int, lt, attend, tp=None) -> None:
    """Every layer for ``m`` rows on tensor cores: bf16 normed rows into the QKV GEMM, then
    ``attend(ch, i, lw, p)`` adds the layer's RoPE/append and attention stages (which read
    ``r.qkv`` and write ``r.attn``), then O GEMM + residual and the MLP; fp32 residual ``r.x``.
    ``tp``: a tensor-parallel rank's shard (an all-reduce of ``r.x`` after O and after down)."""
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    eps = cfg.rms_norm_eps
    for i, lw in enumerate(w.layers):
        p = f"layer{i}"
        ch.add(f"{p}.attn_norm", ew.rms_norm_bf16(rt, r.xn, r.x, lw.attn_norm, rows=m, cols=h, eps=eps),
               [r.x, lw.attn_norm], [r.xn])
        ch.add(f"{p}.qkv", gm.gemm(rt, r.qkv, lw.qkv, r.xn, m=m, n=(hq + 2 * hkv) * d, k=h, bias=lw.qkv_bias,
                                   lt=lt), [r.xn, lw.qkv, lw.qkv_bias], [r.qkv])
        attend(ch, i, lw, p)
        ch.add(f"{p}.o", gm.gemm(rt, r.x, lw.o, r.attn, m=m, n=h, k=hq * d, residual=_residual(tp, r.x), lt=lt),
               [r.attn, lw.o], [r.x])
        ch.sum_partials(tp, f"{p}.o", r.x)
        ch.add(f"{p}.mlp_norm", ew.rms_norm_bf16(rt, r.xn, r.x, lw.mlp_norm, rows=m, cols=h, eps=eps),
               [r.x, lw.mlp_norm], [r.xn])
        ch.add(f"{p}.gate_up", gm.gemm(rt, r.gate_up, lw.gate_up, r.xn, m=m, n=2 * inter, k=h, lt=lt),
               [r.xn, lw.gate_up], [r.gate_up])
        ch.add(f"{p}.silu_mul", ew.silu_mul_bf16(rt, r.act, r.gate_up, rows=m, cols=inter), [r.gate_up], [r.act])
        ch.add(f"{p}.down", gm.gemm(rt, r.x, lw.down, r.act, m=m, n=h, k=inter, residual=_residual(tp, r.x),
                                    lt=lt), [r.act, lw.down], [r.x])
        ch.sum_partials(tp, f"{p}.down", r.x)


def _rows(b, m: int) -> SimpleNamespace:
    """The first ``m`` rows of each activation buffer of ``b``."""
    return SimpleNamespace(x=b.hidden[0:m], xn=b.normed[0:m], qkv=b.qkv[0:m], q=b.q[0:m], attn=b.attn[0:m],
                           gate_up=b.gate_up[0:m], act=b.act[0:m])


def _lm_head_rows(ch: _Chain, rt, cfg, w, r, m: int, lt, logits, tp=None, gathered=None, out=None) -> None:
    """Final norm and the LM-head GEMM of ``m`` rows into ``logits`` (fp32 [m, vocab]). Under
    tensor parallelism ``logits`` is the rank's fp32 ``[m, V/N]`` and ``gathered`` (fp32, ``N·m·V/N``
    elements) gets every rank's in rank order: ``[N, m, V/N]``, which ``out`` (fp32 ``[m, V]``), when
    given, receives as whole rows (:meth:`~.collectives.RankComm.unpack_rows`); else the caller
    reorders it (:func:`~.collectives.RankComm` gathers one decode row in place instead)."""
    h = cfg.hidden_size
    ch.add("final_norm", ew.rms_norm_bf16(rt, r.xn, r.x, w.final_norm, rows=m, cols=h, eps=cfg.rms_norm_eps),
           [r.x, w.final_norm], [r.xn])
    ch.add("lm_head", gm.gemm(rt, logits, w.lm_head, r.xn, m=m, n=logits.shape[-1], k=h, lt=lt),
           [r.xn, w.lm_head], [logits])
    if tp is not None:
        ch.add("lm_head.all_gather", tp.all_gather(logits, gathered), [logits], [gathered])
        if out is not None:
            ch.add("lm_head.unpack", tp.unpack_rows(gathered, out), [gathered], [out])


def _batch_lm_head(ch: _Chain, rt, cfg, w, bb, r, m: int, lt, logits, tp=None) -> None:
    """The LM head of ``m`` batch rows into ``logits`` (fp32 [m, vocab], rows of ``bb.logits``);
    under tensor parallelism through the rank's slice rows ``bb.rank_logits`` and the gather
    buffer ``bb.gathered`` (:class:`~.batch_buffers.BatchBuffers` made with ``vocab_part``)."""
    if tp is None:
        _lm_head_rows(ch, rt, cfg, w, r, m, lt, logits)
        return
    if bb.rank_logits is None or bb.rank_logits.shape[-1] != tp.vocab_part:
        raise ValueError("a tensor-parallel rank's batch chains need BatchBuffers(..., vocab_part=V/N, ranks=N)")
    _lm_head_rows(ch, rt, cfg, w, r, m, lt, bb.rank_logits[0:m], tp, bb.gathered[0:tp.size * m * tp.vocab_part],
                  out=logits)


def prefill_stages(rt, cfg, w, b, m: int, lt, *, all_logits=None, tp=None, gathered=None) -> list:
    """``m`` prompt rows from ``b.ids`` at positions ``*pos ..`` through every layer, on tensor
    cores: bf16 operands (normed rows, attention rows, the MLP activation) into cuBLASLt
    GEMMs (``lt``), fp32 residual stream. The hidden rows are left in ``b.hidden`` (see
    :func:`logits_stages`); with ``all_logits`` (fp32 [m, vocab]) every row's logits too.
    ``tp``: a tensor-parallel rank's shard; ``all_logits`` is then its ``[m, V/N]`` and
    ``gathered`` every rank's (see :func:`_lm_head_rows`)."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    r = _rows(b, m)
    ch = _Chain(f"prefill{m}")
    ch.add("embed", ew.embedding(rt, r.x, b.ids[0:m], w.embed, m=m, hidden=cfg.hidden_size, vocab=cfg.vocab_size),
           [b.ids, w.embed], [r.x])

    def attend(ch, i, lw, p):
        ch.add(f"{p}.rope_append", rope.rope_append(
            rt, r.qkv, r.q, b.k_pools[i], b.v_pools[i], b.block_table, b.pos, w.inv_freq, num_q_heads=hq,
            num_kv_heads=hkv, head_dim=d, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=cfg.rms_norm_eps,
            host_pools=b.host_pools(i)),
            [r.qkv, b.pos, b.block_table], [r.q, b.k_pools[i], b.v_pools[i]])
        ch.add(f"{p}.attention", attn_pre.attention_prefill(
            rt, r.q, r.attn, b.k_pools[i], b.v_pools[i], b.block_table, b.pos, num_q_heads=hq, num_kv_heads=hkv,
            head_dim=d, host_pools=b.host_pools(i)), [r.q, b.k_pools[i], b.v_pools[i]], [r.attn])

    _tensor_core_layers(ch, rt, cfg, w, r, m, lt, attend, tp)
    if all_logits is not None:
        _lm_head_rows(ch, rt, cfg, w, r, m, lt, all_logits, tp, gathered)
    return ch.stages


def batch_decode_stages(rt, cfg, w, bb, m: int, lt, workspace, fixed_chunk: int = 0, scores=None, tp=None) -> list:
    """One id for each of ``m`` sequences (the batched step): ``bb.ids[r]`` at the position,
    cache slot and block-table row ``bb.meta[r]`` through every layer on tensor cores (GEMMs of
    ``m`` rows), the LM head into ``bb.logits[0:m]`` and each row's pick into ``bb.next[0:m]`` by the
    batched sampler (row r's ``bb.params[r]`` at ``bb.steps[r]``; zero params are greedy).
    Attention reads each row's own table (``bb.tables``) with the rows kernels (their tensor-core
    twins where :func:`~nexusrt.kernels.ops.attention_decode.mma_ok`, except with ``scores``);
    ``workspace`` is its split workspace for ``m`` rows. ``scores`` (an ``attention_decode.ScoresWorkspace``): every
    layer's attention also writes each key's score, and adds its probabilities summed over the
    heads into ``scores.scores`` (h2o KV pruning; the caller zeroes it before the replay).
    ``tp``: a tensor-parallel rank's shard (all-reduces after O and down, the vocab-parallel LM
    head gathered into whole rows before the sampler); a rank's scores would cover its own heads
    only, so it takes no ``scores`` (ValueError)."""
    if tp is not None and scores is not None:
        raise ValueError("h2o scores on a tensor-parallel rank would cover its own heads only; not offered")
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    r, meta, logits = _rows(bb, m), bb.meta[0:m], bb.logits[0:m]
    ch = _Chain(f"batch{m}" + ("-scores" if scores is not None else ""))
    ch.add("embed", ew.embedding(rt, r.x, bb.ids[0:m], w.embed, m=m, hidden=cfg.hidden_size, vocab=cfg.vocab_size),
           [bb.ids, w.embed], [r.x])

    def attend(ch, i, lw, p):
        ch.add(f"{p}.rope_append", rope.rope_append(
            rt, r.qkv, r.q, bb.k_pools[i], bb.v_pools[i], bb.tables, meta, w.inv_freq, num_q_heads=hq,
            num_kv_heads=hkv, head_dim=d, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=cfg.rms_norm_eps, rows=True),
            [r.qkv, meta, bb.tables], [r.q, bb.k_pools[i], bb.v_pools[i]])
        ch.add(f"{p}.attention", attn_dec.attention_decode(
            rt, r.q, r.attn, bb.k_pools[i], bb.v_pools[i], bb.tables, meta, workspace, num_q_heads=hq,
            num_kv_heads=hkv, head_dim=d, fixed_chunk=fixed_chunk, scores=scores,
            mma=scores is None and attn_dec.mma_ok(rt)),
            [r.q, bb.k_pools[i], bb.v_pools[i]], [r.attn] + ([scores.raw, scores.ml] if scores is not None else []))
        if scores is not None:
            ch.add(f"{p}.scores", attn_dec.accumulate_scores(rt, scores, meta, rows=m, num_q_heads=hq),
                   [scores.raw, scores.ml, meta, scores.scores], [scores.scores])

    _tensor_core_layers(ch, rt, cfg, w, r, m, lt, attend, tp)
    _batch_lm_head(ch, rt, cfg, w, bb, r, m, lt, logits, tp)
    part, finish = sampling.sample_rows(rt, logits, bb.params[0:m], bb.steps[0:m], bb.part_val[0:m],
                                        bb.part_idx[0:m], bb.next[0:m])
    ch.add("sample.partial", part, [logits, bb.params], [bb.part_val, bb.part_idx])
    ch.add("sample.finish", finish, [logits, bb.params, bb.steps, bb.part_val, bb.part_idx], [bb.next])
    return ch.stages


def ragged_prefill_stages(rt, cfg, w, b, rg, m: int, lt, attention=None, tp=None) -> list:
    """The prompt chunks of a step as ``m`` ragged rows (:mod:`.ragged_layout`): ``b.ids[0:m]``
    through every layer with GEMMs of ``m`` rows; RoPE/append once with the rows kernel (each
    row's position, slot and table row from ``rg.meta``, tables ``rg.tables``); attention per
    chunk on its slice. ``attention[i]``: layer ``i``'s per-chunk stages as ``(name, spec)``; with
    None, one marker ``layer{i}.attention`` stands where they go (the runner's cached program
    launches them there). Hidden rows are left in ``b.hidden``. ``tp``: a tensor-parallel rank's
    shard (an all-reduce of the rows after O and after down)."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    r, meta = _rows(b, m), rg.meta[0:m]
    ch = _Chain(f"ragged{m}")
    ch.add("embed", ew.embedding(rt, r.x, b.ids[0:m], w.embed, m=m, hidden=cfg.hidden_size, vocab=cfg.vocab_size),
           [b.ids, w.embed], [r.x])

    def attend(ch, i, lw, p):
        pools = [b.k_pools[i], b.v_pools[i]]
        ch.add(f"{p}.rope_append", rope.rope_append(
            rt, r.qkv, r.q, b.k_pools[i], b.v_pools[i], rg.tables, meta, w.inv_freq, num_q_heads=hq,
            num_kv_heads=hkv, head_dim=d, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=cfg.rms_norm_eps, rows=True),
            [r.qkv, meta, rg.tables], [r.q] + pools)
        for name, spec in (attention[i] if attention is not None else ()):
            ch.add(f"{p}.attention.{name}", spec, [r.q, rg.tables, rg.starts] + pools, [r.attn])
        ch.add(f"{p}.attention", None, [r.q, rg.tables, rg.starts] + pools, [r.attn])

    _tensor_core_layers(ch, rt, cfg, w, r, m, lt, attend, tp)
    return ch.stages


def chunk_logits_stages(rt, cfg, w, bb, m: int, lt, tp=None) -> list:
    """Final norm and LM-head GEMM of ``bb.hidden[0:m]`` (each prompt chunk's last row, gathered
    there) into the chunks' logits rows ``bb.logits[bmax:bmax + m]`` (``tp``: vocab-parallel, gathered)."""
    ch = _Chain(f"chunk_logits{m}")
    _batch_lm_head(ch, rt, cfg, w, bb, _rows(bb, m), m, lt, bb.logits[bb.bmax:bb.bmax + m], tp)
    return ch.stages
