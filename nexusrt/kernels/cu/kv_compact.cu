// kv_compact: KV pruning's compaction (serving/pruning.py; the NumPy meaning is
// kvcache.blocks.compact_tokens). Moves the K and V rows of one sequence's cache slots
// keep[first .. count-1] (ascending, distinct) to slots first .. count-1 through its block
// table, in every layer's pools. Slots below `first` stay where they are (the host passes the
// length of keep's identity prefix, keep[i] == i, e.g. the sink tokens), so past it keep[i] > i.
//
// pools int64 [2 * layers]: the address of each bf16 pool [blocks][Hkv][16][D], layer l's K
// at 2l and its V at 2l + 1. table int32 [>= blocks covering keep[count-1]], keep int32 [count].
//
// grid (Hkv, 2 * layers), block 128: block (h, p) owns KV head h of pools[p] for every slot,
// so no two blocks touch the same bytes and blocks need no order. Inside a block, a
// destination slot i may be the source of another kept slot j < i (keep[j] == i: the
// sink-window's shift by one does this for every slot), so the block walks the slots in
// tiles, in ascending order, loading a whole tile's sources into registers, then
// __syncthreads, then storing the tile:
//  - within a tile every source is read before any destination is written;
//  - a later tile's sources keep[j] >= j lie past every slot written so far;
//  - a later tile's destinations, which an earlier tile may have read, are written only after
//    that later tile's barrier, which every thread reaches after all of its earlier reads.
// One barrier per tile is therefore enough. The loads are plain, not ld.global.nc: this
// kernel writes the memory it reads, which the read-only path does not allow.
#include "attn_common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 8;  // rows each thread holds per tile (8 x 16 bytes of registers)

template <int D>
__device__ __forceinline__ void kv_compact_impl(const long long* __restrict__ pools, const int* __restrict__ table,
                                                const int* __restrict__ keep, int count, int first, int Hkv) {
    static_assert(D % 64 == 0, "head_dim must be a multiple of 64");
    constexpr int kRowLanes = D / 8;               // lanes per K/V row, 16 bytes (8 bf16) each
    constexpr int kRows = kThreads / kRowLanes;    // rows a pass of the block covers
    constexpr int kTile = kRows * kUnroll;         // slots per tile
    const int h = blockIdx.x;
    __nv_bfloat16* pool = reinterpret_cast<__nv_bfloat16*>(pools[blockIdx.y]);
    const int row = threadIdx.x / kRowLanes;
    const int dim0 = (threadIdx.x % kRowLanes) * 8;

    for (int base = first; base < count; base += kTile) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kRows + row;
            if (i < count)
                v[u] = *reinterpret_cast<const uint4*>(pool + nrt_attn::kv_offset(table, keep[i], h, Hkv, D) + dim0);
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kRows + row;
            if (i < count)
                *reinterpret_cast<uint4*>(pool + nrt_attn::kv_offset(table, i, h, Hkv, D) + dim0) = v[u];
        }
    }
}

}  // namespace

#define NRT_KV_COMPACT(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(kThreads) kv_compact_d##D(                             \
        const long long* pools, const int* table, const int* keep, int count, int first, int Hkv) {     \
        kv_compact_impl<D>(pools, table, keep, count, first, Hkv);                                     \
    }

NRT_KV_COMPACT(64)
NRT_KV_COMPACT(128)
NRT_KV_COMPACT(256)
