// The tiles of the persistent decode kernel (persistent_decode.cuh): one device function per
// opcode of nexusrt/backends/cuda/megakernel/instructions.py Op, each the arithmetic of the
// verified graph-path kernel it replaces (gemv.cu, rope.cu, attention_decode.cu, elementwise.cu
// embedding, sampling.cu: its greedy partial/combine and, shared through sampling_topk.cuh, its
// exact top-K draw, which a sampled step reaches through the grid-wide top-K of
// sampling_grid.cuh). interpret.py is the specification of what each computes.
//
// A CTA of kThreads threads runs one tile at a time. Data written by OTHER CTAs of this launch
// (activations, the newest K/V row) is read with ld.global.cg (L2, never L1 or the
// non-coherent read-only path), after the CTA's acquire of the guarding counter. Weights and
// the KV rows of earlier steps are immutable during the launch and use the streaming loads.
//
// gemv_tile loads its weights with 16-byte loads after the tile's wait (the default); with
// NEXUSRT_PERSISTENT_RING=1 or loader the kernel's GEMV tiles read them from the bulk-copy ring of
// persistent_ring.cuh instead (weights need no counter, so the copies run ahead of the list).
#pragma once

#include "argmax.cuh"
#include "attn_common.cuh"
#include "common.cuh"
#include "sampling_grid.cuh"

namespace nrt_pk {

constexpr int kThreads = 256;
constexpr int kChunkLoads = 8;  // logits each thread loads at once in the sampler's chunk passes (~V/132 per chunk)
constexpr int kWarps = kThreads / 32;
constexpr int kU = 8;            // 16-byte weight loads in flight per lane in a row dot
constexpr int kMaxSplits = 128;  // attention parts per KV head the combine can weigh
typedef unsigned long long u64;

// Writes the kernel's five debug words (the host reads them back as a sentence:
// backends/cuda/persistent.py fault_record) and traps. Out of line on purpose: a __trap inlined
// into the compute warps' code made ptxas allocate that code with the launch's 168 registers
// instead of the 232 the loader entries' setmaxnreg gives it (NOTES_persistent.md, "The loader
// warpgroup").
__device__ __noinline__ void fail(int* debug, int w0, int w1, int w2, int w3, int w4) {
    debug[0] = w0; debug[1] = w1; debug[2] = w2; debug[3] = w3; debug[4] = w4;
    __threadfence_system();
    __trap();
}

// A wait that lasts this long is a bug (a counter never signalled, a copy never issued, a page
// never read): it records itself in the debug words and traps. Timed by the clock, not by a count
// of tries: a counter wait sleeps up to 128 ns a try and a failed mbarrier try_wait up to its
// suspend hint (bulk_copy.cuh, 1 ms), so a count would bound them at seconds and at hours.
constexpr unsigned long long kWaitNs = 10ull * 1000 * 1000 * 1000;

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Whether a wait that first failed at `since` (0: just now, which it records) has outlasted kWaitNs.
__device__ __forceinline__ bool wait_expired(unsigned long long& since) {
    const unsigned long long now = global_ns();
    if (since == 0) since = now;
    return now - since > kWaitNs;
}

__device__ __forceinline__ float4 ldcg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// Stage x[0..K) (times rstd * norm_w when norm_w is set) into shared memory as gemv.cu's
// stage_x does for one token and no split: two float4 planes, xs4[h * K/8 + c] holds elements
// 8c + 4h .. 8c + 4h + 3 (conflict-free LDS.128 in row_dot). The sum of squares runs over the
// same float4 stride of 256 threads with fmaf, so rstd has the same bits as the GEMV kernel's.
__device__ __forceinline__ void stage_input(float* xs, const float* x, const float* norm_w, float eps, int K,
                                            float* scratch) {
    const int tid = threadIdx.x, nch = K / 8;
    float r = 1.0f;
    if (norm_w != nullptr) {
        float ss = 0.0f;
        for (int i = tid; i < K / 4; i += kThreads) {
            const float4 v = ldcg4(x + 4 * i);
            ss = fmaf(v.x, v.x, ss); ss = fmaf(v.y, v.y, ss);
            ss = fmaf(v.z, v.z, ss); ss = fmaf(v.w, v.w, ss);
        }
        ss = nrt::block_sum(ss, scratch);
        r = 1.0f / sqrtf(ss / (float)K + eps);
    }
    float4* xs4 = reinterpret_cast<float4*>(xs);
    for (int i = tid; i < 2 * nch; i += kThreads) {
        float4 v = ldcg4(x + 4 * i);
        if (norm_w != nullptr) {
            const float4 w = __ldg(reinterpret_cast<const float4*>(norm_w) + i);
            v.x = v.x * r * w.x; v.y = v.y * r * w.y; v.z = v.z * r * w.z; v.w = v.w * r * w.w;
        }
        xs4[(i & 1) * nch + (i >> 1)] = v;
    }
    nrt::block_sync();
}

// One bf16 row (K = 8 * nch) times the staged input; every lane gets the total. Lane l sums
// chunks l, l + 32, ... in order and the warp reduces with warp_sum: gemv.cu's order.
__device__ __forceinline__ float row_dot(const __nv_bfloat16* __restrict__ row, const float* xs, int nch, int lane) {
    const float4* x4 = reinterpret_cast<const float4*>(xs);
    float acc = 0.0f;
    for (int c0 = 0; c0 < nch; c0 += 32 * kU) {
        uint4 w[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < nch) w[u] = nrt::ld_stream_128(row + (size_t)c * 8);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < nch) acc += nrt::dot8(w[u], x4[c], x4[nch + c]);
        }
    }
    return nrt::warp_sum(acc);
}

// Two rows at once: both rows' weight loads are in flight together (twice the bytes per warp
// round trip: a 16-row tile is one round trip per warp instead of two, and gate/up pairs a gate
// row with its up row). Each row's sum is row_dot's, in row_dot's order: the same bits.
__device__ __forceinline__ float2 row_dot2(const __nv_bfloat16* __restrict__ r0, const __nv_bfloat16* __restrict__ r1,
                                           const float* xs, int nch, int lane) {
    const float4* x4 = reinterpret_cast<const float4*>(xs);
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int c0 = 0; c0 < nch; c0 += 32 * kU) {
        uint4 w0[kU], w1[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < nch) {
                w0[u] = nrt::ld_stream_128(r0 + (size_t)c * 8);
                w1[u] = nrt::ld_stream_128(r1 + (size_t)c * 8);
            }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < nch) {
                acc0 += nrt::dot8(w0[u], x4[c], x4[nch + c]);
                acc1 += nrt::dot8(w1[u], x4[c], x4[nch + c]);
            }
        }
    }
    return make_float2(nrt::warp_sum(acc0), nrt::warp_sum(acc1));
}

enum GemvKind : int { kPlain = 0, kBiasF32 = 1, kResidual = 2, kGateUp = 3 };

// Lane 0's epilogue of output row j.
__device__ __forceinline__ void gemv_store(float* y, const float* bias, int kind, int j, float v) {
    if (kind == kBiasF32) v += __ldg(bias + j);
    if (kind == kResidual) v += __ldcg(y + j);
    y[j] = v;
}

// Rows [a, b) of y = W . xs (+ fp32 bias | + y as residual | silu(gate) * up with up row
// N + j): one warp per row. kPair: two rows in flight per warp (row_dot2): rows j and
// j + kWarps, or for gate/up row j's gate and up rows; the kernels whose attention already
// needs every register (GM = 8) take one row at a time (pairs would spill there). Same bits
// either way. For kResidual y aliases the residual: the lane that writes y[j] read it first.
template <bool kPair>
__device__ __forceinline__ void gemv_tile(float* y, const __nv_bfloat16* __restrict__ W, const float* xs,
                                          const float* bias, int kind, int a, int b, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nch = K / 8;
    if (!kPair) {
        for (int j = a + warp; j < b; j += kWarps) {
            float v = row_dot(W + (size_t)j * K, xs, nch, lane);
            if (kind == kGateUp) v = nrt::silu(v) * row_dot(W + (size_t)(N + j) * K, xs, nch, lane);
            if (lane == 0) {
                if (kind == kGateUp) y[j] = v;
                else gemv_store(y, bias, kind, j, v);
            }
        }
        return;
    }
    if (kind == kGateUp) {
        for (int j = a + warp; j < b; j += kWarps) {
            const float2 gu = row_dot2(W + (size_t)j * K, W + (size_t)(N + j) * K, xs, nch, lane);
            if (lane == 0) y[j] = nrt::silu(gu.x) * gu.y;
        }
        return;
    }
    for (int j = a + warp; j < b; j += 2 * kWarps) {
        const int j2 = j + kWarps;
        if (j2 < b) {
            const float2 v = row_dot2(W + (size_t)j * K, W + (size_t)j2 * K, xs, nch, lane);
            if (lane == 0) {
                gemv_store(y, bias, kind, j, v.x);
                gemv_store(y, bias, kind, j2, v.y);
            }
        } else {
            const float v = row_dot(W + (size_t)j * K, xs, nch, lane);
            if (lane == 0) gemv_store(y, bias, kind, j, v);
        }
    }
}

// x = float(embed[token]); an id outside [0, V) gives a NaN row (elementwise.cu's rule).
__device__ __forceinline__ void embed_tile(float* x, const __nv_bfloat16* table, int id, int H, int V) {
    const bool ok = id >= 0 && id < V;
    const unsigned short* row = reinterpret_cast<const unsigned short*>(table) + (size_t)(ok ? id : 0) * H;
    for (int i = threadIdx.x; i < H; i += kThreads)
        x[i] = ok ? nrt::bf16_bits_to_float(row[i]) : __int_as_float(0x7fc00000);
}

// KV head kv at position t: its G q heads (q_norm, RoPE) into q, its k head (k_norm, RoPE)
// and v head into the pools at slot t, bf16 (rope.cu's per-head work, one warp per head).
template <int D>
__device__ __forceinline__ void rope_tile(const float* qkv, float* q, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,
                                          const int* table, int t, int kv, int Hq, int Hkv, const float* inv_freq,
                                          const float* q_norm, const float* k_norm, float eps) {
    constexpr int kHalf = D / 2, kPairs = D / 64;
    const int lane = threadIdx.x & 31, G = Hq / Hkv;
    for (int job = threadIdx.x >> 5; job < G + 2; job += kWarps) {
        const int head = job < G ? kv * G + job : (job == G ? Hq + kv : Hq + Hkv + kv);
        const float* src = qkv + (size_t)head * D;
        float x1[kPairs], x2[kPairs];
#pragma unroll
        for (int k = 0; k < kPairs; ++k) {
            x1[k] = __ldcg(src + lane + 32 * k);
            x2[k] = __ldcg(src + kHalf + lane + 32 * k);
        }
        if (job <= G) nrt_attn::norm_rope_head<D>(x1, x2, job < G ? q_norm : k_norm, eps, t, inv_freq, lane);
        if (job < G) {
            float* dst = q + (size_t)head * D;
#pragma unroll
            for (int k = 0; k < kPairs; ++k) {
                dst[lane + 32 * k] = x1[k];
                dst[kHalf + lane + 32 * k] = x2[k];
            }
        } else {
            __nv_bfloat16* dst = (job == G ? k_pool : v_pool) + nrt_attn::kv_offset(table, t, kv, Hkv, D);
#pragma unroll
            for (int k = 0; k < kPairs; ++k) {
                dst[lane + 32 * k] = __float2bfloat16_rn(x1[k]);
                dst[kHalf + lane + 32 * k] = __float2bfloat16_rn(x2[k]);
            }
        }
    }
}

// Whether this step samples (temperature > 0) or picks greedily. The host rewrites the struct
// only between launches, so every CTA of a launch reads the same answer.
__device__ __forceinline__ bool samples(const SampleParams* params) { return params->temperature > 0.f; }

// SAMPLE_PARTIAL of chunk `chunk` = logits[a, b). Greedy: sample_argmax_partial's work, the
// (max, lowest index) into slot `chunk` of the partials. Sampled: phase 1 of the grid-wide top-K
// (sampling_grid.cuh), the chunk's key histogram added to the grid's; sh_hist (kBuckets words)
// overlays the staged GEMV input, which the caller must then consider lost.
__device__ __forceinline__ void sample_partial_tile(const float* logits, int a, int b, int chunk,
                                                    const SampleParams* params, float* part_val, int* part_idx,
                                                    unsigned* hist, unsigned* sh_hist, float* sv, int* si) {
    if (samples(params)) {
        add_chunk_histogram<kChunkLoads>(L2Logits{logits}, a, b, sh_hist, hist);
        return;
    }
    float best = -__int_as_float(0x7f800000);
    int bi = INT_MAX;
    for (int i = a + threadIdx.x; i < b; i += kThreads) {
        const float v = __ldcg(logits + i);
        if (nrt_argmax::better(v, i, best, bi)) { best = v; bi = i; }
    }
    nrt_argmax::block_argmax(best, bi, sv, si);
    if (threadIdx.x == 0) { part_val[chunk] = best; part_idx[chunk] = bi; }
}

// SAMPLE_GATHER of chunk logits[a, b) (sampled steps only; a greedy step skips its waits and
// this, see persistent_decode.cuh): phase 2 of the grid-wide top-K, the chunk's candidates into
// the pool when the complete histogram says they fit. stage (stage_cap keys) overlays the staged
// GEMV input, which the caller must then consider lost.
__device__ __forceinline__ void sample_gather_tile(const float* logits, int a, int b, int vocab,
                                                   const SampleParams* params, unsigned* hist,
                                                   unsigned long long* pool, unsigned long long* stage, int stage_cap,
                                                   int* scratch, PoolPlan& plan_sh) {
    const PoolPlan plan = threshold_bucket<kThreads>(hist, candidate_count(*params, vocab), scratch, plan_sh);
    gather_chunk_candidates<kChunkLoads>(L2Logits{logits}, a, b, plan, hist + kCursorWord, pool, stage, stage_cap,
                                         scratch);
}

// sample_finish's work: the next token, then written as that kernel writes it: token word,
// ring[step % ring_size] (host memory, published before the state moves on), pos += 1 and
// step += 1. Greedy: the best of `count` partials (every logit NaN: token 0). Sampled: phase 3
// of the grid-wide top-K, the draw from the pool the gathers filled, or (the pool overflowed:
// cursor 0) sample_topk over all `vocab` logits, read from L2 (other CTAs wrote them); then the
// histogram and cursor are cleared for the next step. `sh` may overlay the staged GEMV input,
// which the caller must then consider lost.
__device__ __forceinline__ void sample_finish_tile(const float* logits, int vocab, const SampleParams* params,
                                                   const float* part_val, const int* part_idx, int count,
                                                   unsigned* hist, const unsigned long long* pool,
                                                   int* state, int* ring, int ring_size, PoolShared& sh,
                                                   float* sv, int* si) {
    const int step = __ldcg(state + 1);
    int token;
    if (samples(params)) {
        const int pooled = (int)__ldcg(hist + kCursorWord);
        token = pooled > 0 ? sample_from_pool<kThreads>(vocab, pool, pooled, *params, step, sh)
                           : sample_topk<kThreads>(L2Logits{logits}, vocab, *params, step, sh);
        clear_grid_topk(hist);  // both paths end in barriers after every thread read the cursor
    } else {
        float best = -__int_as_float(0x7f800000);
        int bi = INT_MAX;
        for (int i = threadIdx.x; i < count; i += kThreads) {
            const float v = __ldcg(part_val + i);
            const int idx = __ldcg(part_idx + i);
            if (nrt_argmax::better(v, idx, best, bi)) { best = v; bi = idx; }
        }
        nrt_argmax::block_argmax(best, bi, sv, si);
        token = bi == INT_MAX ? 0 : bi;
    }
    if (threadIdx.x == 0) {
        state[2] = token;
        ring[(unsigned)step % (unsigned)ring_size] = token;
        __threadfence_system();
        state[0] = __ldcg(state) + 1;
        state[1] = step + 1;
    }
}

}  // namespace nrt_pk
