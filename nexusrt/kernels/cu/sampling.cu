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
// order) and a bitonic sort of 64-bit keys (logit, ~index); that machinery (sample_topk) and
// the SampleParams struct are in sampling_topk.cuh, which the persistent decode kernel's
// finish instruction runs too. Parameters live in a device struct so a new generate() call
// only rewrites 24 bytes, never the captured graph.
//
// Batched form (the serving engine's step): sample_rows_partial grid (num_parts, M) and
// sample_rows_finish grid (M) pick each of M rows of logits [M][vocab] with its own
// SampleParams params[r] and step steps[r] into out[r]. Both pairs run the same device
// functions (chunk_argmax, combine_partials below, sample_topk of sampling_topk.cuh).
#include <cuda/std/cstdint>
#include "common.cuh"  // nrt::uniform01, the RNG shared with the CPU
#include "argmax.cuh"
#include "sampling_topk.cuh"
#include <cuda/std/climits>
#include <cuda/std/limits>

namespace {

using nrt_argmax::better;
using nrt_argmax::block_argmax;

constexpr int kPartThreads = 256;
constexpr int kPartChunk = 4096;  // logits per partial-argmax block
constexpr int kFinishThreads = 1024;
constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();

// The (max, lowest index) of logits[base, base + 4096) (block of 256; every thread gets it).
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
__device__ __forceinline__ void combine_partials(const float* __restrict__ part_val,
                                                const int* __restrict__ part_idx, int num_parts,
                                                FinishShared& sh, int& i) {
    const int tid = threadIdx.x;
    float v = tid < num_parts ? part_val[tid] : kNegInf;
    i = tid < num_parts ? part_idx[tid] : INT_MAX;
    block_argmax(v, i, sh.wv, sh.wi);
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
    float best;
    int bi;
    chunk_argmax(logits, vocab, blockIdx.x * kPartChunk, best, bi, sv, si);
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
        int i;
        combine_partials(part_val, part_idx, num_parts, sh, i);
        token = i == INT_MAX ? 0 : i;  // every logit NaN: token 0
    } else {
        token = sample_topk(PlainLogits{logits}, vocab, p, cur_step, sh);
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
    __shared__ FinishShared sh;
    nrt::pdl_enter();
    const int row = blockIdx.x;
    if (row >= M) return;
    const SampleParams p = params[row];
    const long long at = (long long)row * num_parts;
    int token;
    if (!(p.temperature > 0.f))
        combine_partials(part_val + at, part_idx + at, num_parts, sh, token);
    else
        token = sample_topk(PlainLogits{logits + (long long)row * vocab}, vocab, p, steps[row], sh);
    if (threadIdx.x == 0) out[row] = token;
}

