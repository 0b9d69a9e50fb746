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
// keys only: a key gives its logit back exactly (key_logit). The keys, the workspace and the
// block primitives are in sampling_keys.cuh, the sorts in sampling_sort.cuh.
#pragma once

#include "sampling_sort.cuh"

namespace {

// Radix-select the K-th largest of keys[0, n) (K <= n; all threads get it). k_rem: how many
// keys equal to it the top K take; eq_count: how many keys equal it.
template <class Keys, class Shared>
__device__ unsigned select_threshold(const Keys keys, int n, int K,
                                     Shared& sh, int& k_rem, int& eq_count) {
    const int tid = threadIdx.x, lane = tid & 31;
    unsigned prefix = 0, mask = 0;
    k_rem = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nrt::block_threads()) sh.hist[b] = 0;
        nrt::block_sync();
#pragma unroll 4
        for (int i = tid; i < n; i += nrt::block_threads()) {
            const unsigned key = keys[i];
            if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
        }
        nrt::block_sync();
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
        nrt::block_sync();
        prefix |= (unsigned)sh.bucket << shift;
        mask |= 255u << shift;
        k_rem = sh.k_rem;
        eq_count = sh.eq_count;
        nrt::block_sync();  // sh.* is rewritten by the next pass
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
    nrt::block_sync();
    const bool take_all_equal = eq_count == k_rem;  // the usual case: no tie at the threshold
    for (int i = tid; i < vocab; i += nrt::block_threads()) {
        const unsigned key = order_key(logits[i]);
        if (key > thr || (take_all_equal && key == thr)) {
            const int slot = atomicAdd(&sh.count, 1);
            sh.cand[slot] = candidate_key(key, i);
        }
    }
    if (take_all_equal) { nrt::block_sync(); return; }
    // Ties at the threshold: walk the vocabulary in index order, the block's threads at a time, ranking
    // the equal keys with a block scan; stop once k_rem of them are in.
    const int n_gt = K - k_rem;
    int taken = 0;
    for (int base = 0; base < vocab && taken < k_rem; base += nrt::block_threads()) {
        const int i = base + tid;
        const bool eq = i < vocab && order_key(logits[i]) == thr;
        const unsigned ballot = __ballot_sync(0xffffffffu, eq);
        nrt::block_sync();
        if (lane == 0) sh.wi[warp] = __popc(ballot);
        nrt::block_sync();
        int before = 0, total = 0;
        for (int w = 0; w < (int)(nrt::block_threads() >> 5); ++w) {
            before += w < warp ? sh.wi[w] : 0;
            total += sh.wi[w];
        }
        const int rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
        if (eq && rank < k_rem)
            sh.cand[n_gt + rank] = candidate_key(thr, i);
        taken += total;
    }
    nrt::block_sync();
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

// Top-p and the draw over the sorted candidates sh.cand[0, K), whose sh.cum[r] = exp(z_r - z_0)
// (bucket_sort_top or bitonic_top wrote them); returns the token at `step`.
// c_j = sum_{i<=j} exp(z_i - z_0) in fp32, sequential (the spec fixes the order); c is
// non-decreasing, so "the first j with c_j >= x" is the count of j with c_j < x, which
// the block counts in parallel.
template <class Shared>
__device__ int draw_token(const SampleParams& p, int K, int step, Shared& sh) {
    if (threadIdx.x == 0) running_sum(sh.cum, K);
    nrt::block_sync();
    const float cut = p.top_p * sh.cum[K - 1];  // fp32 product, as the spec says
    const int n = min(K, block_count(K, [&](int r) { return sh.cum[r] < cut; }) + 1);
    const double target = nrt::uniform01(p.seed, (unsigned long long)(unsigned)step) * (double)sh.cum[n - 1];
    const int below = block_count(n, [&](int r) { return (double)sh.cum[r] <= target; });
    return candidate_index(sh.cand[min(below, n - 1)]);
}

// The end of every exact top-K draw: src[0, count) holds the candidate_key()s of a set that
// contains the top K (count >= K; any order; src is sh.cand, CandidateList, or the grid
// sampler's pool); sort them (bucket_sort_top; bitonic_top, in shared memory, when they are too
// many or its buckets are crowded) and draw among the first K at `step`. sample_topk gathers
// exactly K; the grid sampler's pool may hold more.
template <int kBlock, class Src, class Shared>
__device__ __forceinline__ int sort_and_draw(const Src src, int count, int K, const SampleParams& p, int step,
                                             Shared& sh) {
    if (count > kBucketSortMax || !bucket_sort_top<kBlock>(sh, src, count, K, p.temperature)) {
        src.into_shared(sh.cand, count);
        bitonic_top(sh, count, K, p.temperature);
    }
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
    return sort_and_draw<kBlock>(CandidateList{sh.cand}, K, K, p, step, sh);
}

}  // namespace
