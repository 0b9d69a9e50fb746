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
// Three launches, one block per 1024 logits in the first two: sample_argmax_partial,
// sample_gather, then sample_finish (one block of 1024 threads). Greedy: the partials' (max,
// index) per chunk, a gather that does nothing, the finish combining the partials. Sampled:
// the grid-wide exact top-K of sampling_grid.cuh (the persistent kernel runs the same three
// phases as instructions): the partials add their chunk's 12-bit key histogram to the grid's,
// the gathers find the K-th key's bucket in the complete histogram and append every logit at
// or above it to a candidate pool, and the finish selects, sorts and draws over that pool only
// (sample_topk over all logits when the pool would overflow), then zeroes the histogram and
// cursor for the next step. The spread of the selection over the grid is the point: one block
// running sample_topk over a 128k vocabulary cost ~0.17 ms a token on an H200. Parameters live
// in a device struct so a new generate() call only rewrites 24 bytes, never the captured graph.
//
// Batched form (the serving engine's step): sample_rows_partial grid (num_parts, M) and
// sample_rows_finish grid (M) pick each of M rows of logits [M][vocab] with its own
// SampleParams params[r] and step steps[r] into out[r]. Both pairs run the same device
// functions (chunk_argmax, combine_partials below, sample_topk of sampling_topk.cuh).
#include <cuda/std/cstdint>
#include "common.cuh"  // nrt::uniform01, the RNG shared with the CPU
#include "argmax.cuh"
#include "sampling_grid.cuh"  // sampling_topk.cuh and the grid-wide top-K
#include <cuda/std/climits>
#include <cuda/std/limits>

namespace {

using nrt_argmax::better;
using nrt_argmax::block_argmax;

constexpr int kPartThreads = 256;
// Logits per partial / gather block: 1024 (126 blocks for a 128k vocabulary) measured faster on
// the H200 than 4096 (32 blocks) for greedy and sampled steps alike (kernels/NOTES.md, sampling.cu).
constexpr int kPartChunk = 1024;
constexpr int kFinishThreads = 1024;
constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();

// The (max, lowest index) of logits[base, base + kPartChunk) (block of 256; every thread gets it).
__device__ __forceinline__ void chunk_argmax(const float* __restrict__ logits, int vocab, int base,
                                             float& best, int& bi, float* sv, int* si) {
    best = kNegInf;
    bi = INT_MAX;
#pragma unroll
    for (int k = 0; k < kPartChunk / kPartThreads; ++k) {
        const int i = base + k * kPartThreads + threadIdx.x;
        if (i < vocab) {
            const float v = logits[i];
            if (better(v, i, best, bi)) { best = v; bi = i; }
        }
    }
    block_argmax(best, bi, sv, si);
}

// Greedy: the best of num_parts (<= blockDim.x) partials; INT_MAX when every logit is NaN.
// (Out-parameters here and in chunk_argmax, not return values or stores inside: that keeps
// the one-row kernels' register allocation, hence their SASS, what it was before the split.)
template <class Shared>
__device__ __forceinline__ void combine_partials(const float* __restrict__ part_val,
                                                const int* __restrict__ part_idx, int num_parts,
                                                Shared& sh, int& i) {
    const int tid = threadIdx.x;
    float v = tid < num_parts ? part_val[tid] : kNegInf;
    i = tid < num_parts ? part_idx[tid] : INT_MAX;
    block_argmax(v, i, sh.wv, sh.wi);
}

}  // namespace

// grid ceil(vocab / kPartChunk), block 256: greedy, the (max, lowest index) of each chunk;
// sampled, their key histogram added to hist (uint32 [kBuckets + 1]: the buckets, then the pool
// cursor; zero at the start of every step).
extern "C" __global__ void __launch_bounds__(kPartThreads) sample_argmax_partial(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    float* __restrict__ part_val, int* __restrict__ part_idx, unsigned* __restrict__ hist) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ unsigned sh_hist[kBuckets];
    nrt::pdl_enter();  // the logits come from the kernel before (see pdl.cuh)
    if (params->temperature > 0.f) {
        const int a = blockIdx.x * kPartChunk;
        add_chunk_histogram<kPartChunk / kPartThreads>(PlainLogits{logits}, a, min(a + kPartChunk, vocab), sh_hist, hist);
        return;
    }
    float best;
    int bi;
    chunk_argmax(logits, vocab, blockIdx.x * kPartChunk, best, bi, sv, si);
    if (threadIdx.x == 0) { part_val[blockIdx.x] = best; part_idx[blockIdx.x] = bi; }
}

// grid ceil(vocab / kPartChunk), block 256, after every partial: sampled, the block's chunk of
// candidates (keys in the K-th key's bucket or above) appended to the pool when the complete
// histogram says they all fit (phase 2 of sampling_grid.cuh); greedy, nothing.
extern "C" __global__ void __launch_bounds__(kPartThreads) sample_gather(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    unsigned* __restrict__ hist, unsigned long long* __restrict__ pool) {
    __shared__ int scratch[32];
    __shared__ PoolPlan plan_sh;
    __shared__ unsigned long long stage[kPartChunk];  // the chunk's candidates (at most all of it)
    nrt::pdl_enter();  // also when greedy: the finish relies on this grid completing after the partials
    if (!(params->temperature > 0.f)) return;
    const PoolPlan plan = threshold_bucket<kPartThreads>(hist, candidate_count(*params, vocab), scratch, plan_sh);
    const int a = blockIdx.x * kPartChunk;
    gather_chunk_candidates<kPartChunk / kPartThreads>(PlainLogits{logits}, a, min(a + kPartChunk, vocab), plan,
                                                       hist + kCursorWord, pool, stage, kPartChunk, scratch);
}

// grid 1, block 1024. num_parts = ceil(vocab / kPartChunk) <= 1024.
extern "C" __global__ void __launch_bounds__(kFinishThreads) sample_finish(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    const float* __restrict__ part_val, const int* __restrict__ part_idx, int num_parts,
    unsigned* __restrict__ hist, const unsigned long long* __restrict__ pool,
    int* pos, int* step, int* token_out, int* ring, int ring_size) {
    __shared__ PoolShared sh;
    nrt::pdl_enter();
    const int tid = threadIdx.x;
    const SampleParams p = *params;
    const int cur_step = *step;
    int token;
    if (!(p.temperature > 0.f)) {
        int i;
        combine_partials(part_val, part_idx, num_parts, sh, i);
        token = i == INT_MAX ? 0 : i;  // every logit NaN: token 0
    } else {
        const int pooled = (int)hist[kCursorWord];  // 0: the pool would have overflowed
        token = pooled > 0 ? sample_from_pool<kFinishThreads>(vocab, pool, pooled, p, cur_step, sh)
                           : sample_topk<kFinishThreads>(PlainLogits{logits}, vocab, p, cur_step, sh);
        clear_grid_topk(hist);  // both paths end in barriers after every thread read the cursor
    }
    if (tid == 0) {
        *token_out = token;
        ring[(unsigned)cur_step % (unsigned)ring_size] = token;
        __threadfence_system();  // the ring is host memory: publish before the state moves on
        *pos += 1;
        *step = cur_step + 1;
    }
}

// The batched form (the serving engine's step): M rows of fp32 logits [M][vocab], row r
// picked by params[r] at steps[r] into out[r], in one launch pair. Same algorithm and code as
// the one-row pair above; no graph state is advanced (the host tracks each request's step).
// grid (num_parts, M), block 256: row blockIdx.y's partials into part_val/part_idx
// [M][num_parts], num_parts = gridDim.x; skipped for a row that samples.
extern "C" __global__ void __launch_bounds__(kPartThreads) sample_rows_partial(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    float* __restrict__ part_val, int* __restrict__ part_idx, int M) {
    __shared__ float sv[32];
    __shared__ int si[32];
    nrt::pdl_enter();
    const int row = blockIdx.y;
    if (row >= M || params[row].temperature > 0.f) return;
    float best;
    int bi;
    chunk_argmax(logits + (long long)row * vocab, vocab, blockIdx.x * kPartChunk, best, bi, sv, si);
    if (threadIdx.x == 0) {
        const long long at = (long long)row * gridDim.x + blockIdx.x;
        part_val[at] = best;
        part_idx[at] = bi;
    }
}

// grid (M), block 1024: row blockIdx.x's token into out[row]. A greedy row of NaN gives
// INT_MAX (the host reports it), not the one-row kernel's token 0.
extern "C" __global__ void __launch_bounds__(kFinishThreads) sample_rows_finish(
    const float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params,
    const int* __restrict__ steps, const float* __restrict__ part_val,
    const int* __restrict__ part_idx, int num_parts, int* __restrict__ out, int M) {
    __shared__ PoolShared sh;
    nrt::pdl_enter();
    const int row = blockIdx.x;
    if (row >= M) return;
    const SampleParams p = params[row];
    const long long at = (long long)row * num_parts;
    int token;
    if (!(p.temperature > 0.f))
        combine_partials(part_val + at, part_idx + at, num_parts, sh, token);
    else
        token = sample_topk<kFinishThreads>(PlainLogits{logits + (long long)row * vocab}, vocab, p, steps[row], sh);
    if (threadIdx.x == 0) out[row] = token;
}

