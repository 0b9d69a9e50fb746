// The sampler's vocabulary, shared by sampling_sort.cuh and sampling_topk.cuh (and through them
// sampling.cu and the persistent kernel's finish): the parameter struct, how a row of logits is
// read (PlainLogits, L2Logits), the order-preserving key of a logit and its inverse, the 64-bit
// candidate key (value descending, then index ascending), the finish's shared-memory workspace
// (TopkShared) and the block-wide scan and count the sorts and the draw use.
#pragma once

#include <cuda/std/cstdint>
#include "common.cuh"


// The sampling parameters in device memory (24 bytes; kernels/ops/sampling.py pack_params
// writes them), so a new generate() call rewrites a struct, never a captured graph.
struct SampleParams {
    float temperature;  // 0: greedy
    int top_k;          // 0 or > 1024: the 1024 cap
    float top_p;        // >= 1: no nucleus cut
    int pad_;
    unsigned long long seed;
};

namespace {

constexpr int kMaxCand = 1024;  // K_MAX of reference/sampling.py

// How a row's logits are read. sampling.cu's kernels read logits an earlier launch wrote
// (plain loads); the persistent kernel reads logits other CTAs of the SAME launch wrote, so
// they must come from L2 (ld.global.cg), never a non-coherent L1 / read-only path.
struct PlainLogits {
    const float* __restrict__ p;
    __device__ __forceinline__ float operator[](int i) const { return p[i]; }
};
struct L2Logits {
    const float* p;
    __device__ __forceinline__ float operator[](int i) const { return __ldcg(p + i); }
};

// uint32 whose unsigned order is the float order; -0 is folded into +0 (they compare equal
// in the spec) and NaN sorts below everything.
__device__ __forceinline__ unsigned order_key(float x) {
    if (x != x) return 0u;
    if (x == 0.f) x = 0.f;
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The logit whose order_key is `key` (its inverse). -0 comes back as +0, which gives the same
// z - z_0 in every case; NaN's key 0 comes back as a NaN.
__device__ __forceinline__ float key_logit(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// The keys of a row of logits, read through its accessor.
template <class Logits>
struct LogitKeys {
    Logits logits;
    __device__ __forceinline__ unsigned operator[](int i) const { return order_key(logits[i]); }
};

// K = min(top_k or 1024, 1024, vocab): how many candidates the spec draws from.
__device__ __forceinline__ int candidate_count(const SampleParams& p, int vocab) {
    const int K = (p.top_k <= 0 || p.top_k > kMaxCand) ? kMaxCand : p.top_k;
    return min(K, vocab);
}

// A candidate's 64-bit sort key: descending order is value descending, then index ascending.
__device__ __forceinline__ unsigned long long candidate_key(unsigned key, int index) {
    return ((unsigned long long)key << 32) | (0xFFFFFFFFu - (unsigned)index);
}
__device__ __forceinline__ int candidate_index(unsigned long long c) {
    return (int)(0xFFFFFFFFu - (unsigned)(c & 0xFFFFFFFFull));
}

constexpr int kSortBuckets = 1024;    // buckets of bucket_sort_top
constexpr int kCrowded = 64;          // a bucket holding more keys sends the sort to bitonic_top
constexpr int kBucketSortMax = 2048;  // the most candidates bucket_sort_top takes (registers)

// kCand: how many 64-bit candidates cand[] holds (sampling_grid.cuh's pool size). Its slots
// from kMaxCand on are also bucket_sort_top's scratch, hence the lower bound.
template <int kCand>
struct TopkShared {
    static_assert(kCand >= 2 * kMaxCand + kCrowded && (kCand & (kCand - 1)) == 0,
                  "the bitonic sort needs a power of two; bucket_sort_top needs scratch above kMaxCand");
    unsigned long long cand[kCand];     // candidate_key()s, sorted descending
    alignas(16) float cum[kMaxCand];    // exp(z - z_0) at each rank, then its running sum
    int bstart[kSortBuckets + 1];       // bucket_sort_top: bucket sizes, then first ranks
    unsigned hist[256];
    float wv[32];
    int wi[32];
    int count;
    int bucket, k_rem, eq_count;
};

// The exclusive prefix of v over the block's threads (thread order); *total gets the block's
// sum. scratch: 32 ints of shared memory, free again when it returns. The warps' totals are
// scanned by warp 0 with shuffles: at 1,024 threads a loop over 32 totals in every thread
// cost more than the rest of the scan.
__device__ __forceinline__ int block_exclusive_sum(int v, int* scratch, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (nrt::block_threads() + 31) >> 5;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
    }
    if (lane == 31) scratch[warp] = incl;
    nrt::block_sync();
    if (warp == 0) {
        int w = lane < warps ? scratch[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int o = __shfl_up_sync(0xffffffffu, w, off);
            if (lane >= off) w += o;
        }
        scratch[lane] = w;  // warps 0..lane together
    }
    nrt::block_sync();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    total = scratch[warps - 1];
    nrt::block_sync();  // scratch is the caller's again
    return before + incl - v;
}

// How many of the ranks r < limit have pred(r) true (every thread gets it); ranks are taken
// the block's threads at a time so any block size counts all of them.
template <class Pred>
__device__ __forceinline__ int block_count(int limit, Pred pred) {
    int total = 0;
    for (int base = 0; base < limit; base += nrt::block_threads()) {
        const int r = base + (int)threadIdx.x;
        total += nrt::block_count(r < limit && pred(r));
    }
    return total;
}

}  // namespace
