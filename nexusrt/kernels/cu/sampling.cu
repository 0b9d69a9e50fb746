// On-device sampling: the last step of the decode graph. From fp32 logits [vocab] pick the
// next token exactly as nexusrt/reference/sampling.py specifies (its docstring is the spec):
//   temperature == 0: argmax, lowest index on ties;
//   otherwise: candidates = the K = min(top_k or 1024, 1024, vocab) largest logits, value
//   desc then index asc; z = logit / T; c_j = running fp32 sum of exp(z_j - z_0) in rank
//   order; keep n = the shortest prefix with c_{n-1} >= top_p * c_{K-1}; u = uniform(seed,
//   step) (splitmix64); pick the first j < n with c_j > u * c_{n-1} (in double), else n-1.
// Then it writes the token id to *token_out and ring[step % ring_size] (host-mapped, so the
// host reads tokens without a sync per token) and advances the graph's state *pos, *step.
//
// Two launches: sample_argmax_partial (many blocks, one (max, index) per 4096 logits) and
// sample_finish (one block of 1024 threads), which either combines the partials (greedy)
// or runs the exact top-K: a 4-pass radix select on the order-preserving uint32 of the
// logits, a gather of the K winners (ties at the threshold broken by index, in index
// order) and a bitonic sort of 64-bit keys (logit, ~index). Parameters live in a device
// struct so a new generate() call only rewrites 24 bytes, never the captured graph.
#include <cuda/std/cstdint>
#include "pdl.cuh"
#include "argmax.cuh"
#include <cuda/std/climits>
#include <cuda/std/limits>

struct SampleParams {
    float temperature;  // 0: greedy
    int top_k;          // 0 or > 1024: the 1024 cap
    float top_p;        // >= 1: no nucleus cut
    int pad_;
    unsigned long long seed;
};

namespace {

using nrt_argmax::better;
using nrt_argmax::block_argmax;

constexpr int kPartThreads = 256;
constexpr int kPartChunk = 4096;  // logits per partial-argmax block
constexpr int kFinishThreads = 1024;
constexpr int kMaxCand = 1024;
constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();

// uint32 whose unsigned order is the float order; -0 is folded into +0 (they compare equal
// in the spec) and NaN sorts below everything.
__device__ __forceinline__ unsigned order_key(float x) {
    if (x != x) return 0u;
    if (x == 0.f) x = 0.f;
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ double uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + i + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

struct FinishShared {
    unsigned long long cand[kMaxCand];  // (order_key << 32) | ~index, sorted descending
    float val[kMaxCand];                // x of the candidate at each rank
    float cum[kMaxCand];                // exp(z - z_0) at each rank, then its running sum
    unsigned hist[256];
    float wv[32];
    int wi[32];
    int count;
    int bucket, k_rem, eq_count;
};

// Radix-select the K-th largest order key of the logits (all threads get it).
__device__ unsigned select_threshold(const float* __restrict__ logits, int vocab, int K,
                                     FinishShared& sh, int& k_rem, int& eq_count) {
    const int tid = threadIdx.x, lane = tid & 31;
    unsigned prefix = 0, mask = 0;
    k_rem = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) sh.hist[b] = 0;
        __syncthreads();
#pragma unroll 4
        for (int i = tid; i < vocab; i += blockDim.x) {
            const unsigned key = order_key(logits[i]);
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
__device__ void gather_candidates(const float* __restrict__ logits, int vocab, int K,
                                  unsigned thr, int k_rem, int eq_count, FinishShared& sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) sh.count = 0;
    __syncthreads();
    const bool take_all_equal = eq_count == k_rem;  // the usual case: no tie at the threshold
    for (int i = tid; i < vocab; i += blockDim.x) {
        const unsigned key = order_key(logits[i]);
        if (key > thr || (take_all_equal && key == thr)) {
            const int slot = atomicAdd(&sh.count, 1);
            sh.cand[slot] = ((unsigned long long)key << 32) | (0xFFFFFFFFu - (unsigned)i);
        }
    }
    if (take_all_equal) { __syncthreads(); return; }
    // Ties at the threshold: walk the vocabulary in index order, 1024 at a time, ranking
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
            sh.cand[n_gt + rank] = ((unsigned long long)thr << 32) | (0xFFFFFFFFu - (unsigned)i);
        taken += total;
    }
    __syncthreads();
}

// Sort sh.cand[0, n) descending (n a power of two; slots >= K are padded with 0).
__device__ void bitonic_desc(FinishShared& sh, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            const int idx = threadIdx.x, partner = idx ^ stride;
            if (idx < n && partner > idx) {
                const unsigned long long a = sh.cand[idx], b = sh.cand[partner];
                const bool desc = (idx & size) == 0;
                if (desc ? a < b : a > b) { sh.cand[idx] = b; sh.cand[partner] = a; }
            }
        }
    }
    __syncthreads();
}

// Softmax, top-p and the draw over the sorted candidates; returns the chosen rank.
// c_j = sum_{i<=j} exp(z_i - z_0) in fp32, sequential (the spec fixes the order); c is
// non-decreasing, so "the first j with c_j >= x" is the count of j with c_j < x, which
// the block counts in parallel.
__device__ int draw(const float* __restrict__ logits, float temp, float top_p, int K, double u,
                    FinishShared& sh) {
    const int tid = threadIdx.x;
    if (tid < K) sh.val[tid] = logits[0xFFFFFFFFu - (unsigned)(sh.cand[tid] & 0xFFFFFFFFull)] / temp;
    __syncthreads();
    if (tid < K) sh.cum[tid] = expf(sh.val[tid] - sh.val[0]);
    __syncthreads();
    if (tid == 0) {
        float run = 0.f;
#pragma unroll 8
        for (int r = 0; r < K; ++r) {
            run += sh.cum[r];
            sh.cum[r] = run;
        }
    }
    __syncthreads();
    const float cut = top_p * sh.cum[K - 1];  // fp32 product, as the spec says
    const int n = min(K, __syncthreads_count(tid < K && sh.cum[tid] < cut) + 1);
    const double target = u * (double)sh.cum[n - 1];
    const int below = __syncthreads_count(tid < n && (double)sh.cum[tid] <= target);
    return min(below, n - 1);
}

}  // namespace

// grid ceil(vocab / 4096), block 256: (max, lowest index) of each 4096 logits. Skipped
// when the parameters ask for sampling (sample_finish then reads the logits itself).
extern "C" __global__ void __launch_bounds__(kPartThreads) sample_argmax_partial(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    float* __restrict__ part_val, int* __restrict__ part_idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    nrt::pdl_enter();  // the logits come from the kernel before (see pdl.cuh)
    if (params->temperature > 0.f) return;
    float best = kNegInf;
    int bi = INT_MAX;
    const int base = blockIdx.x * kPartChunk;
#pragma unroll
    for (int k = 0; k < kPartChunk / kPartThreads; ++k) {
        const int i = base + k * kPartThreads + threadIdx.x;
        if (i < vocab) {
            const float v = logits[i];
            if (better(v, i, best, bi)) { best = v; bi = i; }
        }
    }
    block_argmax(best, bi, sv, si);
    if (threadIdx.x == 0) { part_val[blockIdx.x] = best; part_idx[blockIdx.x] = bi; }
}

// grid 1, block 1024. num_parts = ceil(vocab / 4096) <= 1024.
extern "C" __global__ void __launch_bounds__(kFinishThreads) sample_finish(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    const float* __restrict__ part_val, const int* __restrict__ part_idx, int num_parts,
    int* pos, int* step, int* token_out, int* ring, int ring_size) {
    __shared__ FinishShared sh;
    nrt::pdl_enter();
    const int tid = threadIdx.x;
    const SampleParams p = *params;
    const int cur_step = *step;
    int token;
    if (!(p.temperature > 0.f)) {
        float v = tid < num_parts ? part_val[tid] : kNegInf;
        int i = tid < num_parts ? part_idx[tid] : INT_MAX;
        block_argmax(v, i, sh.wv, sh.wi);
        token = i == INT_MAX ? 0 : i;  // every logit NaN: token 0
    } else {
        int K = (p.top_k <= 0 || p.top_k > kMaxCand) ? kMaxCand : p.top_k;
        K = min(K, vocab);
        int k_rem, eq_count;
        const unsigned thr = select_threshold(logits, vocab, K, sh, k_rem, eq_count);
        gather_candidates(logits, vocab, K, thr, k_rem, eq_count, sh);
        int n = 1;
        while (n < K) n <<= 1;
        if (tid >= K && tid < n) sh.cand[tid] = 0ull;
        bitonic_desc(sh, n);
        const double u = uniform(p.seed, (unsigned long long)(unsigned)cur_step);
        const int r = draw(logits, p.temperature, p.top_p, K, u, sh);
        token = (int)(0xFFFFFFFFu - (unsigned)(sh.cand[r] & 0xFFFFFFFFull));
    }
    if (tid == 0) {
        *token_out = token;
        ring[(unsigned)cur_step % (unsigned)ring_size] = token;
        __threadfence_system();  // the ring is host memory: publish before the state moves on
        *pos += 1;
        *step = cur_step + 1;
    }
}

// argmax_rows: the greedy pick of each of M rows of fp32 logits [M][vocab] (the batched
// step), with the rule above: largest value, lowest index on ties, NaN never wins (a row of
// NaN gives INT_MAX, which the host reports as an error). grid (M), block 1024.
extern "C" __global__ void __launch_bounds__(kFinishThreads) argmax_rows(
    const float* __restrict__ logits, int vocab, int* __restrict__ out, int M) {
    __shared__ float sv[32];
    __shared__ int si[32];
    nrt::pdl_enter();
    const int row = blockIdx.x;
    if (row >= M) return;
    const float* x = logits + (long long)row * vocab;
    float best = kNegInf;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (better(v, i, best, bi)) { best = v; bi = i; }
    }
    block_argmax(best, bi, sv, si);
    if (threadIdx.x == 0) out[row] = bi;
}
