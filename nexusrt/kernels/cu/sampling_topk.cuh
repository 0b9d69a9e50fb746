// The exact top-K sampler, shared by sampling.cu (its one-row and its rows kernels) and the
// persistent decode kernel's finish instruction (persistent_tiles.cuh): the order-preserving
// key of a logit, the radix select of the K-th largest key, the gather of the K candidates,
// their sort (a bucket sort; a bitonic network when the keys crowd) and the softmax/top-p draw
// (its seeded uniform is nrt::uniform01 of common.cuh), and sample_topk, which runs them in
// that order.
// Every function works on ONE row of logits with the whole block (all of its threads must
// call it; any multiple of 32 threads: sampling.cu runs 1024, the persistent kernel 256) and
// the block's TopkShared; the caller picks the row and how it is read (PlainLogits,
// L2Logits below). The radix select and the gather read keys through an accessor (LogitKeys
// over a row of logits; sampling_grid.cuh passes the keys of a candidate pool), and the sort and
// draw of a gathered candidate list is one function, sort_and_draw, so the grid-wide sampler of
// sampling_grid.cuh ends with exactly this code and this arithmetic. It needs the candidates'
// keys only: a key gives its logit back exactly (key_logit).
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
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
    }
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = lane < warps ? scratch[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int o = __shfl_up_sync(0xffffffffu, w, off);
            if (lane >= off) w += o;
        }
        scratch[lane] = w;  // warps 0..lane together
    }
    __syncthreads();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    total = scratch[warps - 1];
    __syncthreads();  // scratch is the caller's again
    return before + incl - v;
}

// Radix-select the K-th largest of keys[0, n) (K <= n; all threads get it). k_rem: how many
// keys equal to it the top K take; eq_count: how many keys equal it.
template <class Keys, class Shared>
__device__ unsigned select_threshold(const Keys keys, int n, int K,
                                     Shared& sh, int& k_rem, int& eq_count) {
    const int tid = threadIdx.x, lane = tid & 31;
    unsigned prefix = 0, mask = 0;
    k_rem = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) sh.hist[b] = 0;
        __syncthreads();
#pragma unroll 4
        for (int i = tid; i < n; i += blockDim.x) {
            const unsigned key = keys[i];
            if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid < 32) {
            // Lane L owns buckets 255-8L down to 248-8L: a scan from the top finds the
            // bucket where the k_rem-th largest key falls.
            unsigned own[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) { own[j] = sh.hist[255 - 8 * lane - j]; sum += own[j]; }
            unsigned incl = sum;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned o = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += o;
            }
            unsigned before = incl - sum;
            if (before < (unsigned)k_rem && (unsigned)k_rem <= incl) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (before < (unsigned)k_rem && (unsigned)k_rem <= before + own[j]) {
                        sh.bucket = 255 - 8 * lane - j;
                        sh.k_rem = k_rem - (int)before;
                        sh.eq_count = (int)own[j];
                    }
                    before += own[j];
                }
            }
        }
        __syncthreads();
        prefix |= (unsigned)sh.bucket << shift;
        mask |= 255u << shift;
        k_rem = sh.k_rem;
        eq_count = sh.eq_count;
        __syncthreads();  // sh.* is rewritten by the next pass
    }
    return prefix;
}

// Gather the K candidates into sh.cand (unsorted): every key above the threshold, plus the
// k_rem lowest-index keys equal to it.
template <class Logits, class Shared>
__device__ void gather_candidates(const Logits logits, int vocab, int K,
                                  unsigned thr, int k_rem, int eq_count, Shared& sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) sh.count = 0;
    __syncthreads();
    const bool take_all_equal = eq_count == k_rem;  // the usual case: no tie at the threshold
    for (int i = tid; i < vocab; i += blockDim.x) {
        const unsigned key = order_key(logits[i]);
        if (key > thr || (take_all_equal && key == thr)) {
            const int slot = atomicAdd(&sh.count, 1);
            sh.cand[slot] = candidate_key(key, i);
        }
    }
    if (take_all_equal) { __syncthreads(); return; }
    // Ties at the threshold: walk the vocabulary in index order, blockDim.x at a time, ranking
    // the equal keys with a block scan; stop once k_rem of them are in.
    const int n_gt = K - k_rem;
    int taken = 0;
    for (int base = 0; base < vocab && taken < k_rem; base += blockDim.x) {
        const int i = base + tid;
        const bool eq = i < vocab && order_key(logits[i]) == thr;
        const unsigned ballot = __ballot_sync(0xffffffffu, eq);
        __syncthreads();
        if (lane == 0) sh.wi[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            before += w < warp ? sh.wi[w] : 0;
            total += sh.wi[w];
        }
        const int rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
        if (eq && rank < k_rem)
            sh.cand[n_gt + rank] = candidate_key(thr, i);
        taken += total;
    }
    __syncthreads();
}

// One compare-exchange of a bitonic stage in registers: v is this thread's element, at index idx;
// its partner idx ^ stride (stride < 32) is held by lane ^ stride of the same warp. The pair's
// lower index keeps the larger key in a descending run ((idx & size) == 0), the smaller otherwise.
__device__ __forceinline__ unsigned long long bitonic_shfl(unsigned long long v, int idx, int size, int stride) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, stride);
    const bool keep_max = ((idx & stride) == 0) == ((idx & size) == 0);
    return keep_max ? (v > o ? v : o) : (v < o ? v : o);
}

// The stages of sizes [size_lo, size_hi] whose strides are below 32, in registers: thread t holds
// the elements t, t + blockDim.x, ... one at a time, so every partner index is a lane of its own
// warp (blockDim.x is a multiple of 32) and no block barrier is needed between these stages.
template <class Shared>
__device__ __forceinline__ void bitonic_warp_run(Shared& sh, int n, int size_lo, int size_hi) {
    for (int base = 0; base < n; base += blockDim.x) {  // the same trip count in every thread
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
// barrier each (each thread owns the pairs of indices tid, tid + blockDim.x, ...); the strides
// below 32 of each size run in registers (bitonic_warp_run), all of sizes 2..32 in one run. At
// n = 1,024 that is 21 block barriers instead of 55. Keys are unique (candidate_key) except the
// zero padding, so any correct sort leaves the same array.
template <class Shared>
__device__ void bitonic_desc(Shared& sh, int n) {
    __syncthreads();
    bitonic_warp_run(sh, n, 2, min(n, 32));
    for (int size = 64; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride >= 32; stride >>= 1) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
                const int partner = idx ^ stride;
                if (partner > idx) {
                    const unsigned long long a = sh.cand[idx], b = sh.cand[partner];
                    const bool desc = (idx & size) == 0;
                    if (desc ? a < b : a > b) { sh.cand[idx] = b; sh.cand[partner] = a; }
                }
            }
        }
        __syncthreads();
        bitonic_warp_run(sh, n, size, size);
    }
    __syncthreads();
}

// How many of the ranks r < limit have pred(r) true (every thread gets it); ranks are taken
// blockDim.x at a time so any block size counts all of them.
template <class Pred>
__device__ __forceinline__ int block_count(int limit, Pred pred) {
    int total = 0;
    for (int base = 0; base < limit; base += blockDim.x) {
        const int r = base + (int)threadIdx.x;
        total += __syncthreads_count(r < limit && pred(r));
    }
    return total;
}

// cum[0, K) becomes its running fp32 sum in rank order: one thread, since the spec fixes the
// order of the additions. The next 16 values are loaded before the current 16 are added, so the
// chain of K dependent FADDs does not wait for a shared-memory load every step or two (cum is
// 16-byte aligned and holds kMaxCand >= K rounded up to 16; sums past K are never read). 16,
// not more: sampling.cu's finish runs 1,024 threads, 64 registers each.
__device__ __forceinline__ void running_sum(float* cum, int K) {
    constexpr int kVec = 4;  // float4s per group of 16
    float4* c4 = reinterpret_cast<float4*>(cum);
    float4 next[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) next[j] = c4[j];
    float run = 0.f;
    for (int b = 0; b < K; b += 4 * kVec) {
        float4 cur[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) cur[j] = next[j];
        if (b + 4 * kVec < K) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) next[j] = c4[b / 4 + kVec + j];
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            run += cur[j].x; cur[j].x = run;
            run += cur[j].y; cur[j].y = run;
            run += cur[j].z; cur[j].z = run;
            run += cur[j].w; cur[j].w = run;
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) c4[b / 4 + j] = cur[j];
    }
}

// A candidate list in shared memory (sh.cand), for bucket_sort_top.
struct CandidateList {
    const unsigned long long* cand;
    __device__ __forceinline__ unsigned long long operator[](int i) const { return cand[i]; }
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
// or past `keep` are never looked into, so it selects as it sorts. About 8 block barriers,
// against 21 for bitonic_desc over 1,024 keys plus the radix select's 16 over the pool.
// Returns false having written nothing but its scratch when a bucket holds more than kCrowded
// keys (many equal or near-equal logits); the caller sorts with bitonic_desc then.
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
    __syncthreads();  // also: every candidate is in a register before tmp overwrites cand's upper slots
    for (int w = 0; w < kBlock / 32; ++w) { lo = min(lo, sh.hist[w]); hi = max(hi, sh.hist[32 + w]); }
    const float scale = (float)kSortBuckets / ((float)(hi - lo) + 1.f);
    int slot[kPer];  // place in its bucket, then in tmp (-1: dropped); buckets are recomputed, not held
#pragma unroll
    for (int j = 0; j < kPer; ++j)
        if (tid + j * kBlock < count) slot[j] = atomicAdd(&sh.bstart[sort_bucket((unsigned)(held[j] >> 32), hi, scale)], 1);
    __syncthreads();
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
    if (__syncthreads_or(crowded)) return false;
#pragma unroll
    for (int q = 0; q < kBPer; ++q) { sh.bstart[tid * kBPer + q] = at; at += size[q]; }
    if (tid == 0) sh.bstart[kSortBuckets] = total;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        const int first = tid + j * kBlock < count ? sh.bstart[sort_bucket((unsigned)(held[j] >> 32), hi, scale)] : keep;
        slot[j] = first < keep ? first + slot[j] : -1;
        if (slot[j] >= 0) tmp[slot[j]] = held[j];
    }
    __syncthreads();
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
    __syncthreads();
    return true;
}

// The bitonic alternative to bucket_sort_top (any keys, however crowded): sh.cand[0, count)
// sorted descending (padded with 0 to a power of two, which sorts last), then sh.cum[r] =
// exp(z_r - z_0) for the first K.
template <class Shared>
__device__ void bitonic_top(Shared& sh, int count, int K, float temp) {
    int n = 1;
    while (n < count) n <<= 1;
    for (int r = count + (int)threadIdx.x; r < n; r += blockDim.x) sh.cand[r] = 0ull;
    bitonic_desc(sh, n);
    const float z0 = key_logit((unsigned)(sh.cand[0] >> 32)) / temp;
    for (int r = threadIdx.x; r < K; r += blockDim.x)
        sh.cum[r] = expf(key_logit((unsigned)(sh.cand[r] >> 32)) / temp - z0);
    __syncthreads();
}

// Top-p and the draw over the sorted candidates sh.cand[0, K), whose sh.cum[r] = exp(z_r - z_0)
// (bucket_sort_top or bitonic_top wrote them); returns the token at `step`.
// c_j = sum_{i<=j} exp(z_i - z_0) in fp32, sequential (the spec fixes the order); c is
// non-decreasing, so "the first j with c_j >= x" is the count of j with c_j < x, which
// the block counts in parallel.
template <class Shared>
__device__ int draw_token(const SampleParams& p, int K, int step, Shared& sh) {
    if (threadIdx.x == 0) running_sum(sh.cum, K);
    __syncthreads();
    const float cut = p.top_p * sh.cum[K - 1];  // fp32 product, as the spec says
    const int n = min(K, block_count(K, [&](int r) { return sh.cum[r] < cut; }) + 1);
    const double target = nrt::uniform01(p.seed, (unsigned long long)(unsigned)step) * (double)sh.cum[n - 1];
    const int below = block_count(n, [&](int r) { return (double)sh.cum[r] <= target; });
    return candidate_index(sh.cand[min(below, n - 1)]);
}

// The end of every exact top-K draw: sh.cand[0, count) holds the candidate_key()s of a set that
// contains the top K (count >= K; any order); sort them (bucket_sort_top; bitonic_top when they
// are too many or its buckets are crowded) and draw among the first K at `step`. sample_topk gathers exactly K; the
// grid sampler's pool may hold more.
template <int kBlock, class Shared>
__device__ __forceinline__ int sort_and_draw(int count, int K, const SampleParams& p, int step, Shared& sh) {
    if (count > kBucketSortMax || !bucket_sort_top<kBlock>(sh, CandidateList{sh.cand}, count, K, p.temperature))
        bitonic_top(sh, count, K, p.temperature);
    return draw_token(p, K, step, sh);
}

// Sampling (temperature > 0): the exact top-K draw of one row at `step` (the spec of
// reference/sampling.py). The whole block (kBlock threads) calls it; every thread gets the token.
template <int kBlock, class Logits, class Shared>
__device__ __forceinline__ int sample_topk(const Logits logits, int vocab, const SampleParams& p, int step,
                                           Shared& sh) {
    const int K = candidate_count(p, vocab);
    int k_rem, eq_count;
    const unsigned thr = select_threshold(LogitKeys<Logits>{logits}, vocab, K, sh, k_rem, eq_count);
    gather_candidates(logits, vocab, K, thr, k_rem, eq_count, sh);
    return sort_and_draw<kBlock>(K, K, p, step, sh);
}

}  // namespace
