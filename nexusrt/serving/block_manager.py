"""KV blocks for sequences: block tables from a :class:`~nexusrt.kvcache.blocks.BlockPool`,
with a prefix cache.

**Prefix cache.** A full block (``BLOCK_SIZE`` computed ids) is keyed by a hash chain:
``h_i = H(h_{i-1}, ids of block i)``, so a key names the block's ids *and* everything before
them, which is what its K/V depend on. When a sequence is admitted, its leading full
blocks whose keys are cached are shared (reference counted) instead of computed. A block
whose last user ends keeps its key and waits in an LRU list; it is handed out again (its
key forgotten) only when the pool has no never-used block left, oldest first, and the
tail blocks of a sequence go before its head (they are listed first when it ends).

**Computed once.** While a running sequence computes prompt blocks no one has cached yet,
their keys are *pending*; a waiting sequence whose next uncached block is pending is not
admitted (:meth:`BlockManager.blocked`) until that block is cached, so 64 requests arriving
together with one system prompt compute it once and share it, rather than 64 times.

Every physical block is in exactly one place: the pool's free list, the LRU list (cached,
unreferenced) or referenced by sequences. :meth:`BlockManager.audit` checks that.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ..kvcache.blocks import BLOCK_SIZE, BlockPool, blocks_for
from .sequence import Sequence


def block_key(parent: bytes, ids) -> bytes:
    """The cache key of a full block of ``ids`` after the block keyed ``parent`` (b"" first)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
    return h.digest()


class BlockManager:
    """Block tables of sequences over ``num_blocks`` blocks; ``prefix_caching`` shares full blocks."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True, order=None):
        self.pool = BlockPool(num_blocks, order)
        self.num_blocks = self.pool.num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * self.num_blocks
        self.key_of: dict[int, bytes] = {}  # block -> its cache key (cached blocks only)
        self.cached: dict[bytes, int] = {}  # cache key -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence uses, oldest first
        self.pending: dict[bytes, int] = {}  # key -> seq_id of the running sequence computing that block
        self.hits = 0  # blocks found in the cache
        self.lookups = 0  # full blocks looked up

    # -- accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now: never used plus cached-but-unreferenced."""
        return self.pool.num_free + len(self.lru)

    @property
    def num_used(self) -> int:
        """Blocks referenced by sequences."""
        return self.num_blocks - self.num_free

    def audit(self) -> None:
        """Raise AssertionError unless every block is in exactly one place."""
        free = set(self.pool.free_blocks)
        lru = set(self.lru)
        used = {b for b in range(self.num_blocks) if self.refs[b] > 0}
        assert not (free & lru or free & used or lru & used), "a block is in two places"
        assert len(free) + len(lru) + len(used) == self.num_blocks, "a block is nowhere (leaked)"
        assert all(self.cached[k] == b for b, k in self.key_of.items()), "the cache index disagrees"

    # -- a sequence's blocks ------------------------------------------------------------
    @staticmethod
    def keys(seq: Sequence, blocks: int) -> list[bytes]:
        """The cache keys of ``seq``'s first ``blocks`` full blocks (the chain is kept on the
        sequence: its ids only ever grow, so a key once computed stays right)."""
        chain = seq.block_keys
        ids = seq.all_ids if len(chain) < blocks else None  # built only when a key is missing
        while len(chain) < blocks:
            i = len(chain)
            chain.append(block_key(chain[-1] if chain else b"", ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
        return chain[:blocks]

    @staticmethod
    def shareable(seq: Sequence, blocks: int) -> int:
        """How many of ``seq``'s leading ``blocks`` may be shared: a pruning sequence rewrites its
        blocks past the positions it never evicts (``KvPolicy.stable_prefix``), so only the
        blocks wholly inside those are looked up in, or offered to, the prefix cache."""
        return min(blocks, seq.kv.stable_prefix // BLOCK_SIZE) if seq.kv.prunes else blocks

    def blocked(self, seq: Sequence) -> bool:
        """Whether the first block of ``seq`` that is not cached is being computed by another sequence
        (then admitting ``seq`` now would compute it twice)."""
        if not self.prefix_caching:
            return False
        for key in self.keys(seq, self.shareable(seq, len(seq) // BLOCK_SIZE)):
            if key not in self.cached:
                owner = self.pending.get(key)
                return owner is not None and owner != seq.seq_id
        return False

    def reserve(self, seq: Sequence) -> None:
        """Mark the full blocks ``seq`` will compute, and no one has cached or is computing, pending."""
        if not self.prefix_caching:
            return
        for key in self.keys(seq, self.shareable(seq, len(seq) // BLOCK_SIZE))[len(seq.block_table):]:
            if key not in self.cached:
                self.pending.setdefault(key, seq.seq_id)

    def admit(self, seq: Sequence) -> None:
        """Start ``seq``'s table (it has none): share its cached leading blocks and count them computed.

        At most ``len(seq) - 1`` ids come from the cache: the last one is computed for its logits.
        """
        assert not seq.block_table, f"{seq} already has blocks"
        seq.num_computed = seq.num_cached = 0
        if not self.prefix_caching:
            return
        self.share_cached(seq, (len(seq) - 1) // BLOCK_SIZE)
        seq.num_computed = seq.num_cached = len(seq.block_table) * BLOCK_SIZE

    def share_cached(self, seq: Sequence, blocks: int) -> int:
        """Give ``seq`` (no table yet) its leading cached blocks among its first ``blocks`` full ones
        (shared, reference counted; they count as keyed); how many. None without prefix caching."""
        assert not seq.block_table, f"{seq} already has blocks"
        if not self.prefix_caching:
            return 0
        for key in self.keys(seq, self.shareable(seq, blocks)):
            self.lookups += 1
            block = self.cached.get(key)
            if block is None:
                break
            self.hits += 1
            if self.refs[block] == 0:
                del self.lru[block]
            self.refs[block] += 1
            seq.block_table.append(block)
        seq.num_keyed = len(seq.block_table)
        return len(seq.block_table)

    def can_grow(self, seq: Sequence, tokens: int) -> bool:
        """Whether ``seq``'s table can cover cache slots ``0 .. tokens-1`` now."""
        return blocks_for(tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, tokens: int) -> None:
        """Cover cache slots ``0 .. tokens-1``; raises OutOfMemory (nothing taken) when it cannot."""
        need = blocks_for(tokens) - len(seq.block_table)
        if need <= 0:
            return
        if need > self.num_free:
            self.pool.alloc(need)  # raises the pool's OutOfMemory with the counts
        fresh = self.pool.alloc(min(need, self.pool.num_free))
        while len(fresh) < need:  # evict the least recently used cached block
            block, _ = self.lru.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
            fresh.append(block)
        for b in fresh:
            self.refs[b] = 1
        seq.block_table += fresh
        seq.peak_blocks = max(seq.peak_blocks, len(seq.block_table))

    def shrink(self, seq: Sequence, tokens: int) -> None:
        """Give back ``seq``'s blocks past cache slot ``tokens-1`` (KV pruning compacted its kept
        tokens to the front). They lie past its stable prefix, so no one shares them or keys them."""
        keep = blocks_for(tokens)
        for block in seq.block_table[keep:]:
            self.refs[block] -= 1
            assert self.refs[block] == 0 and block not in self.key_of, f"pruned block {block} is shared"
            self.pool.free([block])
        del seq.block_table[keep:]

    def commit(self, seq: Sequence) -> None:
        """Key the blocks ``seq`` has filled since the last call, so later sequences can share them."""
        if not self.prefix_caching:
            return
        full = self.shareable(seq, seq.num_slots // BLOCK_SIZE)
        keys = self.keys(seq, full)
        for i in range(seq.num_keyed, full):
            key = keys[i]
            if key not in self.cached:  # a twin computed by a sequence admitted alongside stays unkeyed
                self.cached[key] = seq.block_table[i]
                self.key_of[seq.block_table[i]] = key
            if self.pending.get(key) == seq.seq_id:
                del self.pending[key]
        seq.num_keyed = max(seq.num_keyed, full)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (:meth:`release`) and forget what it computed."""
        self.release(seq)
        seq.num_computed = 0
        seq.reset_kv()

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; unkeyed blocks go back to the pool, keyed ones to the LRU list.
        What it computed stays counted (a swapped-out sequence keeps it on the host tier)."""
        for key in seq.block_keys:  # what it was computing is no longer on its way
            if self.pending.get(key) == seq.seq_id:
                del self.pending[key]
        for block in reversed(seq.block_table):  # tail first: evicted before the shared head
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} freed more often than taken"
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.lru[block] = None
                else:
                    self.pool.free([block])
        seq.block_table = []
        seq.num_keyed = 0

    def clear_cache(self) -> None:
        """Forget every unreferenced cached block (they go back to the pool)."""
        while self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
            self.pool.free([block])
