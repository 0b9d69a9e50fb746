// The sorts of the sampler's candidate list (candidate_key()s of sampling_keys.cuh) into the
// spec's order: bucket_sort_top, which also selects the top K and writes exp(z - z_0) per rank,
// and the bitonic network (bitonic_top) for lists whose keys crowd its buckets. Both leave
// sh.cand[0, K) descending and sh.cum[r] ready for the draw (sampling_topk.cuh draw_token).
#pragma once

#include "sampling_keys.cuh"

namespace {

// One compare-exchange of a bitonic stage in registers: v is this thread's element, at index idx;
// its partner idx ^ stride (stride < 32) is held by lane ^ stride of the same warp. The pair's
// lower index keeps the larger key in a descending run ((idx & size) == 0), the smaller otherwise.
__device__ __forceinline__ unsigned long long bitonic_shfl(unsigned long long v, int idx, int size, int stride) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, stride);
    const bool keep_max = ((idx & stride) == 0) == ((idx & size) == 0);
    return keep_max ? (v > o ? v : o) : (v < o ? v : o);
}

// The stages of sizes [size_lo, size_hi] whose strides are below 32, in registers: thread t holds
// the elements t, t + T, ... (T the block's threads) one at a time, so every partner index is a lane of its own
// warp (T is a multiple of 32) and no block barrier is needed between these stages.
template <class Shared>
__device__ __forceinline__ void bitonic_warp_run(Shared& sh, int n, int size_lo, int size_hi) {
    for (int base = 0; base < n; base += nrt::block_threads()) {  // the same trip count in every thread
        const int idx = base + (int)threadIdx.x;
        const bool live = idx < n;  // n < 32: the lanes past it shuffle zeros nobody keeps
        unsigned long long v = live ? sh.cand[idx] : 0ull;
        for (int size = size_lo; size <= size_hi; size <<= 1)
            for (int stride = min(size >> 1, 16); stride > 0; stride >>= 1) v = bitonic_shfl(v, idx, size, stride);
        if (live) sh.cand[idx] = v;
    }
}

// Sort sh.cand[0, n) descending (n a power of two; slots >= K are padded with 0). Strides of 32
// and above pair elements of different warps: those stages go through shared memory with a
// barrier each (each thread owns the pairs of indices tid, tid + T, ...); the strides
// below 32 of each size run in registers (bitonic_warp_run), all of sizes 2..32 in one run. At
// n = 1,024 that is 21 block barriers instead of 55. Keys are unique (candidate_key) except the
// zero padding, so any correct sort leaves the same array.
template <class Shared>
__device__ void bitonic_desc(Shared& sh, int n) {
    nrt::block_sync();
    bitonic_warp_run(sh, n, 2, min(n, 32));
    for (int size = 64; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride >= 32; stride >>= 1) {
            nrt::block_sync();
            for (int idx = threadIdx.x; idx < n; idx += nrt::block_threads()) {
                const int partner = idx ^ stride;
                if (partner > idx) {
                    const unsigned long long a = sh.cand[idx], b = sh.cand[partner];
                    const bool desc = (idx & size) == 0;
                    if (desc ? a < b : a > b) { sh.cand[idx] = b; sh.cand[partner] = a; }
                }
            }
        }
        nrt::block_sync();
        bitonic_warp_run(sh, n, size, size);
    }
    nrt::block_sync();
}

// A candidate list already in shared memory (sh.cand), for bucket_sort_top and sort_and_draw.
// into_shared: what a list elsewhere does before the bitonic network, which sorts sh.cand in
// place; nothing here.
struct CandidateList {
    const unsigned long long* cand;
    __device__ __forceinline__ unsigned long long operator[](int i) const { return cand[i]; }
    __device__ __forceinline__ void into_shared(unsigned long long*, int) const {}
};

// Bucket of a key in [lo, hi] for bucket_sort_top: kSortBuckets equal slices of the key range,
// the largest keys in bucket 0. Each step (uint -> float, the product, the truncation) is
// monotone, so a larger key never lands in a later bucket than a smaller one.
__device__ __forceinline__ int sort_bucket(unsigned key, unsigned hi, float scale) {
    return min(kSortBuckets - 1, (int)((float)(hi - key) * scale));
}

// The candidates src[0, count) (unique candidate_key()s, any order, count <= kBucketSortMax; src
// is sh.cand itself, CandidateList, or the grid sampler's pool in global memory)
// -> the `keep` largest (keep <= min(count, kMaxCand)) in sh.cand[0, keep), descending, with
// sh.cum[r] = exp(z_r - z_0) (z = logit / temp) at each of those ranks. A bucket sort: each key
// goes to one of kSortBuckets equal slices of [lowest, highest] key (bucket 0 the highest), a
// scan of the bucket sizes gives each bucket's first rank, and a key's rank is that plus the
// number of larger keys in its own bucket (a few: the slices are narrow). Buckets that start at
// or past `keep` are never looked into, so it selects as it sorts. About 9 block barriers,
// against 21 for bitonic_desc over 1,024 keys plus the radix select's 16 over the pool.
// Returns false having written nothing but its scratch when a bucket holds more than kCrowded
// keys (many equal or near-equal logits); the caller sorts with bitonic_top then.
template <int kBlock, int kCand, class Src>
__device__ bool bucket_sort_top(TopkShared<kCand>& sh, const Src src, int count, int keep, float temp) {
    constexpr int kPer = kBucketSortMax / kBlock, kBPer = kSortBuckets / kBlock;
    static_assert(kBlock % 32 == 0 && kSortBuckets % kBlock == 0 && kBucketSortMax % kBlock == 0,
                  "whole warps; whole buckets and candidates per thread");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    unsigned long long* const tmp = sh.cand + kMaxCand;  // bucket-ordered keys: < keep + kCrowded slots
    unsigned long long held[kPer];
    unsigned lo = 0xFFFFFFFFu, hi = 0u;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        const int r = tid + j * kBlock;
        held[j] = r < count ? src[r] : 0ull;
        if (r < count) {
            lo = min(lo, (unsigned)(held[j] >> 32));
            hi = max(hi, (unsigned)(held[j] >> 32));
        }
    }
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    if (lane == 0) { sh.hist[warp] = lo; sh.hist[32 + warp] = hi; }
    for (int b = tid; b < kSortBuckets; b += kBlock) sh.bstart[b] = 0;
    nrt::block_sync();  // also: every candidate is in a register before tmp overwrites cand's upper slots
    for (int w = 0; w < kBlock / 32; ++w) { lo = min(lo, sh.hist[w]); hi = max(hi, sh.hist[32 + w]); }
    const float scale = (float)kSortBuckets / ((float)(hi - lo) + 1.f);
    int slot[kPer];  // place in its bucket, then in tmp (-1: dropped); buckets are recomputed, not held
#pragma unroll
    for (int j = 0; j < kPer; ++j)
        if (tid + j * kBlock < count) slot[j] = atomicAdd(&sh.bstart[sort_bucket((unsigned)(held[j] >> 32), hi, scale)], 1);
    nrt::block_sync();
    int size[kBPer], sum = 0;
    bool crowded = false;
#pragma unroll
    for (int q = 0; q < kBPer; ++q) {
        size[q] = sh.bstart[tid * kBPer + q];  // thread t owns buckets [t * kBPer, (t + 1) * kBPer)
        sum += size[q];
        crowded |= size[q] > kCrowded;
    }
    int total;
    int at = block_exclusive_sum(sum, sh.wi, total);  // its barriers order the reads above before the writes
    if (nrt::block_or(crowded)) return false;
#pragma unroll
    for (int q = 0; q < kBPer; ++q) { sh.bstart[tid * kBPer + q] = at; at += size[q]; }
    if (tid == 0) sh.bstart[kSortBuckets] = total;
    nrt::block_sync();
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        const int first = tid + j * kBlock < count ? sh.bstart[sort_bucket((unsigned)(held[j] >> 32), hi, scale)] : keep;
        slot[j] = first < keep ? first + slot[j] : -1;
        if (slot[j] >= 0) tmp[slot[j]] = held[j];
    }
    nrt::block_sync();
    const float z0 = key_logit(hi) / temp;  // hi is the largest key: rank 0's
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        if (slot[j] >= 0) {
            const int b = sort_bucket((unsigned)(held[j] >> 32), hi, scale);
            const int end = sh.bstart[b + 1];
            int rank = sh.bstart[b];
            for (int i = rank; i < end; ++i) rank += tmp[i] > held[j];
            if (rank < keep) {
                sh.cand[rank] = held[j];
                sh.cum[rank] = expf(key_logit((unsigned)(held[j] >> 32)) / temp - z0);
            }
        }
    }
    nrt::block_sync();
    return true;
}

// The bitonic alternative to bucket_sort_top (any keys, however crowded): sh.cand[0, count)
// sorted descending (padded with 0 to a power of two, which sorts last), then sh.cum[r] =
// exp(z_r - z_0) for the first K.
template <class Shared>
__device__ void bitonic_top(Shared& sh, int count, int K, float temp) {
    int n = 1;
    while (n < count) n <<= 1;
    for (int r = count + (int)threadIdx.x; r < n; r += nrt::block_threads()) sh.cand[r] = 0ull;
    bitonic_desc(sh, n);
    const float z0 = key_logit((unsigned)(sh.cand[0] >> 32)) / temp;
    for (int r = threadIdx.x; r < K; r += nrt::block_threads())
        sh.cum[r] = expf(key_logit((unsigned)(sh.cand[r] >> 32)) / temp - z0);
    nrt::block_sync();
}

}  // namespace
