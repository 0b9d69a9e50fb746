"""The batched step's device buffers and its bucket sizes (:mod:`nexusrt.backends.cuda.batch`).

``BatchBuffers`` holds the rows of the batched decode graph (up to the largest bucket), the
logits rows of a step (the batch's, then one per prompt chunk that samples), the rows
kernels' per-row ``meta`` and block tables, the batched sampler's per-logits-row parameters,
steps and partials, the split workspaces per bucket, and the pinned staging every host input
of a step goes through.
"""

from __future__ import annotations

import functools

import numpy as np

from ... import memory
from ...kernels.ops import attention_decode as attn_dec
from ...kernels.ops import sampling as sampling_ops
from ...kvcache.blocks import BLOCK_SIZE
from ...kvcache.tiers import block_bytes
from .buffers import OwnedBuffers, prefill_rows

TAG = "batch"
MAX_BATCH = 256


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, … up to the first power of two at or above ``max_batch`` (at most 256)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"max_batch must be an integer in 1..{MAX_BATCH} on CUDA, got {max_batch!r}")
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _packed(p) -> np.ndarray:
    """A request's ``SamplingParams`` (frozen, so hashable) as the kernel's struct, packed once per
    request rather than every step; seed None packs as 0, as the reference draws it."""
    return sampling_ops.pack_params(p.temperature, p.top_k, p.top_p, p.seed or 0)


class BatchBuffers(OwnedBuffers):
    """The batched step's rows (``bmax`` of them) and the step's pinned staging."""

    def __init__(self, rt, cfg, bmax: int, width: int, prompt_rows: int, k_pools, v_pools,
                 vocab_part: int | None = None, ranks: int = 1):
        """``vocab_part`` and ``ranks``: a tensor-parallel rank's LM-head rows (``V/N``) and ``N``;
        then ``rank_logits`` (fp32 ``[bmax, V/N]``) takes the rank's slice of up to ``bmax`` rows and
        ``gathered`` (fp32 ``N·bmax·V/N``) every rank's, which are unpacked into ``logits`` rows."""
        super().__init__()
        self.rank_logits = self.gathered = None
        self.k_pools, self.v_pools = k_pools, v_pools
        self.bmax, self.width = bmax, width
        # Logits rows: the batch's, then one per prompt chunk that samples (a step holds at most
        # bmax chunks); the prefill tables' staging has one row more, for a lone decode's table.
        prefill_logits = bmax
        rows = bmax + prefill_logits
        parts = sampling_ops.num_parts(cfg.vocab_size)
        try:
            # The activation rows: the prefill's table (one row per batch row), so every allocator agrees.
            dev = {name: ((bmax, *row), dtype) for name, (row, dtype) in prefill_rows(cfg).items()}
            dev.update({"meta": ((bmax, 4), "int32"), "tables": ((bmax, width), "int32"),
                        "logits": ((rows, cfg.vocab_size), "fp32"), "next": ((rows,), "int32"),
                        # The batched sampler's, one row per logits row: its SampleParams struct, step, partials.
                        "params": ((rows, sampling_ops.PARAMS_BYTES), "uint8"), "steps": ((rows,), "int32"),
                        "part_val": ((rows, parts), "fp32"), "part_idx": ((rows, parts), "int32")})
            if vocab_part is not None:
                dev.update({"rank_logits": ((bmax, vocab_part), "fp32"), "gathered": ((ranks * bmax * vocab_part,), "fp32")})
            for name, (shape, dtype) in dev.items():
                setattr(self, name, self._t(memory.empty(shape, dtype, tag=TAG)))
            # The lone decode's RoPE position and cache slot (words 2, 3: table row 0, unused).
            self.one_meta = self._t(memory.zeros((4,), "int32", tag=TAG))
            # Pinned staging, one region per use within a step.
            self.h_ids = self._t(memory.pinned((bmax,), "int32", tag=TAG))
            self.h_prompt = self._t(memory.pinned((prompt_rows,), "int32", tag=TAG))  # chunks' ids, padded
            self.h_meta = self._t(memory.pinned((bmax, 4), "int32", tag=TAG))
            self.h_tables = self._t(memory.pinned((bmax, width), "int32", tag=TAG))
            self.h_pre_tables = self._t(memory.pinned((prefill_logits + 1, width), "int32", tag=TAG))
            self.h_next = self._t(memory.pinned((rows,), "int32", tag=TAG))
            self.h_params = self._t(memory.pinned((rows, sampling_ops.PARAMS_BYTES), "uint8", tag=TAG))
            self.h_steps = self._t(memory.pinned((rows,), "int32", tag=TAG))
            self.workspaces: dict[int, attn_dec.DecodeWorkspace] = {}
        except BaseException:
            self.free()
            raise

    def stage_sampling(self, picks) -> None:
        """Fill the batched sampler's pinned staging (``h_params``, ``h_steps``): ``picks`` holds
        ``(logits row, params, step)`` for each row that wants a pick (``params`` a
        :class:`~nexusrt.reference.sampling.SamplingParams` or None). Every other row, and every
        greedy one, gets zero bytes, which the kernel reads as greedy."""
        params, steps = self.h_params.array, self.h_steps.array
        params[:] = 0
        steps[:] = 0
        for row, p, step in picks:
            if not draws(p):
                continue
            check_step(step)
            params[row] = _packed(p)
            steps[row] = step

    def workspace(self, cfg, rows: int, splits: int):
        """The rows kernel's split workspace for ``rows`` rows (one per bucket, made once)."""
        ws = self.workspaces.get(rows)
        if ws is None:
            ws = self.workspaces[rows] = self._t(attn_dec.alloc_workspace(
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, splits, tag=TAG, rows=rows))
        return ws



def blocks_for_bytes(config, kv_bytes: int) -> int:
    """KV blocks (bf16 K and V of every layer) that fit in ``kv_bytes``."""
    return int(kv_bytes) // block_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)


def draws(params) -> bool:
    """Whether a row with these ``SamplingParams`` (or None) samples rather than takes the argmax."""
    return params is not None and not params.greedy


def check_step(step) -> None:
    """ValueError unless ``step`` fits the batched sampler's int32 step."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < 2**31:
        raise ValueError(f"a sampling entry's step must be an integer in [0, 2**31), got {step!r}")


def check_scores(r) -> None:
    """ValueError unless the entry's ``Rows.scores`` (h2o) covers its slots, as the CPU decoder asks."""
    n = len(r.token_ids)
    if r.scores is not None and len(r.scores) < r.start + n:
        raise ValueError(f"scores hold {len(r.scores)} slots; the rows fill {r.start + n}")


def check_entry(r, max_context: int, width: int, num_blocks: int, vocab: int) -> None:
    """ValueError unless the step entry ``r`` (a :class:`~nexusrt.backends.base.Rows`) fits a runner of
    ``max_context`` tokens, block tables of ``width`` blocks over ``num_blocks``, ids below ``vocab``,
    and a step the sampler can hold where it samples."""
    n = len(r.token_ids)
    if n < 1:
        raise ValueError("a batch entry needs at least one id")
    if r.start < 0 or r.start + n > max_context:
        raise ValueError(f"{r.start + n} tokens exceed the context of {max_context}")
    check_scores(r)
    pos = r.first_position
    if pos < r.start:
        raise ValueError(f"RoPE position {pos} lies below cache slot {r.start} (KV pruning only ever moves a "
                         "token to a lower slot)")
    if pos + n > max_context:
        raise ValueError(f"RoPE positions {pos}..{pos + n - 1} exceed the context of {max_context}")
    table = r.table
    if len(table) * BLOCK_SIZE < r.start + n or len(table) > width:
        raise ValueError(f"the block table ({len(table)} blocks) does not cover slots 0..{r.start + n - 1}")
    if table and (min(table) < 0 or max(table) >= num_blocks):
        raise ValueError(f"a block table names blocks outside 0..{num_blocks - 1}")
    ids = r.token_ids
    lo, hi = (int(ids[0]), int(ids[0])) if n == 1 else (int(np.min(ids)), int(np.max(ids)))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids must be in 0..{vocab - 1}")
    # Here, not only when staging: a lone decode's or the prompt chunks' sampler inputs are staged
    # after their work is enqueued, and a refusal must come before any device work.
    if r.logits and draws(r.params):
        check_step(r.step)
