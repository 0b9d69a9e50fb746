// The grid-wide exact top-K of the persistent kernel's sampler (design, costs and the proof that
// it is the spec's candidate set: nexusrt/kernels/NOTES_persistent.md, "The grid-wide top-K").
// Three phases, each an instruction of the persistent program, every CTA working on its own
// chunk of the vocabulary [a, b):
//
//   1. add_chunk_histogram (SAMPLE_PARTIAL of a sampled step): the chunk's keys (order_key of
//      sampling_keys.cuh) counted per bucket of their top kBucketBits bits in shared memory,
//      then added to the grid's histogram in global memory (one RED per non-empty bucket).
//   2. threshold_bucket + gather_chunk_candidates (SAMPLE_GATHER, after every partial): each
//      CTA reads the complete histogram and finds, by itself (no extra barrier), the bucket B
//      holding the K-th largest key; every key in a bucket >= B is a candidate. When there are
//      at most kPoolMax of them (B's own count is what can make it more: many equal or close
//      logits) the chunk appends its candidates' 64-bit candidate_key()s to the pool (one
//      atomicAdd on the pool cursor per CTA reserves its range); otherwise nobody writes.
//   3. sample_from_pool (SAMPLE_FINISH, after every gather): the pool holds a superset of the
//      top K (all keys of buckets above B, all of B), so sorting it and keeping its first K
//      gives the top K: sort_and_draw, the same sort and draw as sample_topk (a pool above
//      kBucketSortMax keys is first cut to the top K by the block's radix select). A cursor of
//      0 means the pool overflowed (it is never 0 otherwise: K >= 1 candidates exist); the
//      finish then runs sample_topk over all logits.
//      Either way it zeroes the histogram and the cursor for the next step.
// The pool's order depends on which CTA got there first, but candidate_key is unique per logit
// and the sort is total, so the sorted candidates, hence the token, do not.
#pragma once

#include "sampling_topk.cuh"

namespace {

constexpr int kBucketBits = 12;  // sign, the 8 exponent bits and 3 mantissa bits of the logit
constexpr int kBuckets = 1 << kBucketBits;
constexpr int kPoolMax = 4096;  // candidates the pool finish takes (cand[] of PoolShared)
using PoolShared = TopkShared<kPoolMax>;

// The grid's workspace in global memory, zero at the start of every step: hist[kBuckets]
// followed by the pool cursor (uint32 [kBuckets + 1]), and the pool (uint64 [kPoolMax]).
constexpr int kCursorWord = kBuckets;

__device__ __forceinline__ unsigned key_bucket(unsigned key) { return key >> (32 - kBucketBits); }

// f(key, i) for this thread's logits of [a, b) (i = a + threadIdx.x, then the block's thread count apart, in
// that order), kLoads of them loaded before any is used: a plain loop puts one load's whole
// latency (DRAM or L2) between the next load and the shared-memory atomic before it, 16 times
// in a row for sampling.cu's chunks (4,096 logits then; its 1,024 now take their 4 in one batch).
template <int kLoads, class Logits, class F>
__device__ __forceinline__ void for_chunk_keys(const Logits logits, int a, int b, F f) {
    const int step = nrt::block_threads();
    for (int base = a + (int)threadIdx.x; base < b; base += kLoads * step) {
        float x[kLoads];  // the loads first, unconditional (past b: logit b - 1 again, unused)
#pragma unroll
        for (int j = 0; j < kLoads; ++j) x[j] = logits[min(base + j * step, b - 1)];
#pragma unroll
        for (int j = 0; j < kLoads; ++j)
            if (base + j * step < b) f(order_key(x[j]), base + j * step);
    }
}

// Phase 1: the keys of logits[a, b) per bucket into the grid's histogram. sh_hist: kBuckets
// words of shared memory (the block's own counts first, so the global memory sees one RED per
// non-empty bucket, not one per logit on a few hot buckets).
template <int kLoads, class Logits>
__device__ void add_chunk_histogram(const Logits logits, int a, int b, unsigned* sh_hist, unsigned* hist) {
    for (int i = threadIdx.x; i < kBuckets; i += nrt::block_threads()) sh_hist[i] = 0u;
    nrt::block_sync();
    for_chunk_keys<kLoads>(logits, a, b, [&](unsigned key, int) { atomicAdd(&sh_hist[key_bucket(key)], 1u); });
    nrt::block_sync();
    for (int i = threadIdx.x; i < kBuckets; i += nrt::block_threads()) {
        const unsigned c = sh_hist[i];
        if (c != 0u) atomicAdd(hist + i, c);  // result unused: a RED
    }
}

// Where the K-th largest key lies: its bucket, how many keys lie in higher buckets (above) and
// how many in it (in_bucket). bucket -1: the histogram holds fewer than K keys (it cannot, once
// every partial has added its chunk).
struct PoolPlan {
    int bucket, above, in_bucket;
    __device__ __forceinline__ bool fits() const { return bucket >= 0 && above + in_bucket <= kPoolMax; }
};

// Phase 2a: the PoolPlan of the complete histogram (every thread gets it), read from L2 (other
// CTAs added to it) from the top bucket down, kBlock * 4 buckets a round: thread t owns the 4
// buckets just below the round's top - 4t, so a block scan in thread order is a scan downwards.
// The K-th key is usually in the first round (the top 1,024 buckets hold every logit >= 2): one
// 16-byte load per thread, not the whole 16 KB histogram, which every CTA reads at once.
template <int kBlock>
__device__ PoolPlan threshold_bucket(const unsigned* hist, int K, int* scratch, PoolPlan& plan_sh) {
    constexpr int kRound = 4 * kBlock;
    static_assert(kBuckets % kRound == 0, "whole rounds of one uint4 of buckets per thread");
    if (threadIdx.x == 0) plan_sh = PoolPlan{-1, 0, 0};
    int above = 0;  // keys in the rounds already scanned (the same in every thread)
    for (int round_top = kBuckets; round_top > 0; round_top -= kRound) {
        const int top = round_top - 4 * (int)threadIdx.x;  // buckets [top - 4, top)
        const uint4 v = __ldcg(reinterpret_cast<const uint4*>(hist + top - 4));
        const int asc[4] = {(int)v.x, (int)v.y, (int)v.z, (int)v.w};  // asc[j]: bucket top - 4 + j
        const int sum = asc[0] + asc[1] + asc[2] + asc[3];
        int total;
        int before = above + block_exclusive_sum(sum, scratch, total);  // its barriers order plan_sh's writes
        if (before < K && K <= before + sum) {  // exactly one thread: the K-th key is in its buckets
#pragma unroll
            for (int j = 3; j >= 0; --j) {
                if (before < K && K <= before + asc[j]) plan_sh = PoolPlan{top - 4 + j, before, asc[j]};
                before += asc[j];
            }
        }
        nrt::block_sync();
        if (plan_sh.bucket >= 0) break;  // every thread reads the same word here
        above += total;
    }
    const PoolPlan plan = plan_sh;
    nrt::block_sync();  // plan_sh may be rewritten by the next call
    return plan;
}

// Phase 2b: append the candidates of logits[a, b) (keys whose bucket is >= plan.bucket) to the
// pool, when the plan fits; nothing otherwise. One pass over the chunk (from L2): each candidate
// goes to a shared-memory stage (stage_cap keys; a chunk larger than that is done in segments),
// then one atomicAdd on the cursor reserves the block's range and the stage is copied out (two
// passes, count then write, cost one more L2 read of the chunk and a block scan). counter: two
// ints of shared memory (the caller's scratch: threshold_bucket is done with it).
template <int kLoads, class Logits>
__device__ void gather_chunk_candidates(const Logits logits, int a, int b, const PoolPlan plan, unsigned* cursor,
                                        unsigned long long* pool, unsigned long long* stage, int stage_cap,
                                        int* counter) {
    if (!plan.fits()) return;  // the same answer in every CTA: the finish reads every logit
    const unsigned lowest = (unsigned)plan.bucket;
    for (int s = a; s < b; s += stage_cap) {
        const int e = min(b, s + stage_cap);
        if (threadIdx.x == 0) counter[0] = 0;
        nrt::block_sync();
        for_chunk_keys<kLoads>(logits, s, e, [&](unsigned key, int i) {
            if (key_bucket(key) >= lowest) stage[atomicAdd(counter, 1)] = candidate_key(key, i);
        });
        nrt::block_sync();
        const int total = counter[0];
        if (total > 0) {  // the same answer in every thread
            if (threadIdx.x == 0) counter[1] = (int)atomicAdd(cursor, (unsigned)total);
            nrt::block_sync();
            const int at = counter[1];
            for (int r = threadIdx.x; r < total; r += nrt::block_threads()) pool[at + r] = stage[r];
        }
        nrt::block_sync();  // the stage and counter are rewritten by the next segment (or the caller)
    }
}

// The pool in global memory, read from L2 (other CTAs appended to it), for bucket_sort_top;
// into_shared copies it to the block's candidate list (then a barrier).
struct PoolList {
    const unsigned long long* pool;
    __device__ __forceinline__ unsigned long long operator[](int i) const { return __ldcg(pool + i); }
    __device__ __forceinline__ void into_shared(unsigned long long* cand, int count) const {
        for (int r = threadIdx.x; r < count; r += nrt::block_threads()) cand[r] = __ldcg(pool + r);
        nrt::block_sync();
    }
};

// The pool's order keys (the upper half of each candidate_key), for select_threshold.
struct CandidateKeys {
    const unsigned long long* cand;
    __device__ __forceinline__ unsigned operator[](int i) const { return (unsigned)(cand[i] >> 32); }
};

// Phase 3: the token of a sampled step from the `count` candidates of the pool (0 < count <=
// kPoolMax, a superset of the top K): sort_and_draw of the pool, whose bucket sort reads it
// straight from L2 (usually ~1-2k candidates) and selects the top K as it sorts. A pool above
// kBucketSortMax is loaded and cut first, by the radix select of the K-th key, keeping every
// candidate at or above it (K of them, more when the K-th key is tied: all its equal keys stay,
// and the sort by index picks the lowest). The first K after the sort are the top K either way
// (candidate keys are unique).
template <int kBlock>
__device__ int sample_from_pool(int vocab, const unsigned long long* pool, int count, const SampleParams& p, int step,
                                PoolShared& sh) {
    constexpr int kPer = kPoolMax / kBlock;
    const int tid = threadIdx.x, K = candidate_count(p, vocab);
    if (count <= kBucketSortMax) return sort_and_draw<kBlock>(PoolList{pool}, count, K, p, step, sh);
    PoolList{pool}.into_shared(sh.cand, count);
    int k_rem, eq_count;
    const unsigned thr = select_threshold(CandidateKeys{sh.cand}, count, K, sh, k_rem, eq_count);
    // Compact in place: every thread holds its candidates in registers before any is moved.
    unsigned long long held[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) held[j] = tid + j * kBlock < count ? sh.cand[tid + j * kBlock] : 0ull;
    if (tid == 0) sh.count = 0;
    nrt::block_sync();
#pragma unroll
    for (int j = 0; j < kPer; ++j)
        if (tid + j * kBlock < count && (unsigned)(held[j] >> 32) >= thr) sh.cand[atomicAdd(&sh.count, 1)] = held[j];
    nrt::block_sync();
    return sort_and_draw<kBlock>(CandidateList{sh.cand}, sh.count, K, p, step, sh);  // K - k_rem + eq_count
}

// After the finish: the histogram and the cursor back to zero for the next step's partials.
// Call it only once every thread of the block has read the cursor (a barrier after that read).
__device__ __forceinline__ void clear_grid_topk(unsigned* hist) {
    for (int i = threadIdx.x; i <= kCursorWord; i += nrt::block_threads()) hist[i] = 0u;
}

}  // namespace
