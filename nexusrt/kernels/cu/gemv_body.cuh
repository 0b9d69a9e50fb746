// gemv_body.cuh: the decode GEMV's main loop, shared by gemv.cu (plain, gate_up) and
// gemv_rope.cu (the QKV projection with RoPE and the KV append in its epilogue). Each module
// holds only its own entry points; see gemv.cu for the design.
#pragma once

#include "common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

enum : int { kBias = 1, kBiasBf16 = 2, kResidual = 4, kNorm = 8 };

template <int VEC> struct Chunk;

template <> struct Chunk<8> {
    uint4 v;
    __device__ __forceinline__ void load(const __nv_bfloat16* p) { v = nrt::ld_stream_128(p); }
    // xs: this token's staged slice as two float4 planes [2][cs] (conflict-free LDS.128).
    __device__ __forceinline__ float dot(const float* xs, int c, int cs) const {
        const float4* x4 = reinterpret_cast<const float4*>(xs);
        return nrt::dot8(v, x4[c], x4[cs + c]);
    }
};

template <> struct Chunk<1> {
    unsigned short v;
    __device__ __forceinline__ void load(const __nv_bfloat16* p) {
        v = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
    __device__ __forceinline__ float dot(const float* xs, int c, int) const {
        return nrt::bf16_bits_to_float(v) * xs[c];
    }
};

// Load step ``b`` of task ``j``: chunk (b*U + u)*32 + lane of the slice, for each row
// ``row_of(j, r)`` of the task.
template <int VEC, int RPW, int U, class RowOf>
__device__ __forceinline__ void load_step(Chunk<VEC> (&buf)[RPW][U], const __nv_bfloat16* W,
                                          int j, RowOf row_of, int K, int c0, int cs, int b, int lane) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const __nv_bfloat16* row = W + (size_t)row_of(j, r) * K + (size_t)c0 * VEC;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (b * U + u) * 32 + lane;
            if (c < cs) buf[r][u].load(row + (size_t)c * VEC);
        }
    }
}

// Stage x[m, c0*VEC : (c0+cs)*VEC] (times rstd[m] * norm_w when normalising) into shared memory.
template <int VEC>
__device__ void stage_x(float* xs, const float* x, const float* norm_w, float eps, int M, int K,
                        int c0, int cs, bool norm, float* scratch, float* rstd) {
    const int tid = threadIdx.x;
    if (norm) {
        for (int m = 0; m < M; ++m) {
            float ss = 0.0f;
            const float* xm = x + (size_t)m * K;
            if (VEC == 8) {
                const float4* x4 = reinterpret_cast<const float4*>(xm);
                for (int i = tid; i < K / 4; i += blockDim.x) {
                    const float4 v = x4[i];
                    ss = fmaf(v.x, v.x, ss); ss = fmaf(v.y, v.y, ss);
                    ss = fmaf(v.z, v.z, ss); ss = fmaf(v.w, v.w, ss);
                }
            } else {
                for (int i = tid; i < K; i += blockDim.x) ss = fmaf(xm[i], xm[i], ss);
            }
            ss = nrt::block_sum(ss, scratch);
            if (tid == 0) rstd[m] = 1.0f / sqrtf(ss / (float)K + eps);
        }
        __syncthreads();
    }
    for (int m = 0; m < M; ++m) {
        const float r = norm ? rstd[m] : 1.0f;
        float* xsm = xs + (size_t)m * cs * VEC;
        if (VEC == 8) {
            // Plane h holds elements 4h..4h+3 of each chunk: xs4[h*cs + c].
            const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)m * K) + (size_t)c0 * 2;
            const float4* w4 = reinterpret_cast<const float4*>(norm_w) + (size_t)c0 * 2;
            float4* xs4 = reinterpret_cast<float4*>(xsm);
            for (int i = tid; i < 2 * cs; i += blockDim.x) {
                const int c = i >> 1, h = i & 1;
                float4 v = x4[i];
                if (norm) {
                    const float4 w = w4[i];
                    v.x = v.x * r * w.x; v.y = v.y * r * w.y; v.z = v.z * r * w.z; v.w = v.w * r * w.w;
                }
                xs4[h * cs + c] = v;
            }
        } else {
            for (int c = tid; c < cs; c += blockDim.x) {
                float v = x[(size_t)m * K + c0 + c];
                if (norm) v = v * r * norm_w[c0 + c];
                xsm[c] = v;
            }
        }
    }
    __syncthreads();
}

// Bias element i: bf16 with kBiasBf16, else fp32 (the plain, gate_up and fused-RoPE stores).
__device__ __forceinline__ float bias_at(const void* bias, int flags, int i) {
    return (flags & kBiasBf16) ? __bfloat162float(((const __nv_bfloat16*)bias)[i]) : ((const float*)bias)[i];
}

template <int RPW>
__device__ __forceinline__ float epilogue(const float (&v)[RPW], int m, int j, int N,
                                          const void* bias, const float* residual, int flags) {
    float out;
    if (RPW == 1) {
        out = v[0];
        if (flags & kBias) out += bias_at(bias, flags, j);
    } else {
        float g = v[0], u = v[RPW - 1];
        if (flags & kBias) {  // one dtype test for both halves (bias_at twice schedules gemv.cu differently)
            if (flags & kBiasBf16) {
                g += __bfloat162float(((const __nv_bfloat16*)bias)[j]);
                u += __bfloat162float(((const __nv_bfloat16*)bias)[N + j]);
            } else {
                g += ((const float*)bias)[j];
                u += ((const float*)bias)[N + j];
            }
        }
        out = nrt::silu(g) * u;
    }
    // residual may alias y: this thread reads its element before writing it.
    if (flags & kResidual) out += residual[(size_t)m * N + j];
    return out;
}

// N = number of tasks (outputs per token; for gate_up: I, with W holding 2*I rows).
// row_of(j, r): the row of W that is row r of task j (j + r*N for the plain and gate_up kinds).
// store(m, j, v): the lane that holds token m writes task j's RPW sums v (after the epilogue
// the kind applies; split-K hands it the sums of every split, in split order).
// U: 16-byte loads per lane per step and row (the default keeps 8 loads per step in flight over
// all rows of the task). A lane adds its chunks in the same order whatever U is (chunk
// (b*U + u)*32 + lane, ascending), so U changes registers and occupancy, never the sums.
template <int MMAX, int RPW, int VEC, int U = 8 / RPW, class RowOf, class Store>
__device__ __forceinline__ void gemv_body(const __nv_bfloat16* __restrict__ W, const float* __restrict__ x,
                                          const float* __restrict__ norm_w, float eps, int M, int N,
                                          int K, float* ws, int* counters, int flags, RowOf row_of,
                                          Store store) {
    extern __shared__ float4 smem4[];
    float* xs = reinterpret_cast<float*>(smem4);
    __shared__ float scratch[32];
    __shared__ float rstd[MMAX];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = blockIdx.y, splits = gridDim.y;
    const int nchunks = K / VEC;
    const int cps = (nchunks + splits - 1) / splits;
    const int c0 = min(split * cps, nchunks);
    const int cs = min(cps, nchunks - c0);
    const int nb = max(1, (cs + 32 * U - 1) / (32 * U));
    const int task_stride = gridDim.x * kWarps;

    int j = blockIdx.x * kWarps + warp;
    int b = 0;
    Chunk<VEC> cur[RPW][U], nxt[RPW][U];
    if (j < N) load_step<VEC, RPW, U>(cur, W, j, row_of, K, c0, cs, 0, lane);
    // Weights are immutable: their first loads are in flight before we wait for the kernel
    // that produces x (programmatic dependent launch; see pdl.cuh).
    nrt::pdl_enter();

    stage_x<VEC>(xs, x, norm_w, eps, M, K, c0, cs, (flags & kNorm) != 0, scratch, rstd);

    float acc[RPW][MMAX];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int m = 0; m < MMAX; ++m) acc[r][m] = 0.0f;

    while (j < N) {  // warp-uniform
        int jn = j, bn = b + 1;
        if (bn == nb) { bn = 0; jn = j + task_stride; }
        if (jn < N) load_step<VEC, RPW, U>(nxt, W, jn, row_of, K, c0, cs, bn, lane);

#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = (b * U + u) * 32 + lane;
                if (c < cs) {
#pragma unroll
                    for (int m = 0; m < MMAX; ++m)
                        if (m < M) acc[r][m] += cur[r][u].dot(xs + (size_t)m * cs * VEC, c, cs);
                }
            }

        if (bn == 0) {  // task j complete: reduce across the warp and finish it
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int m = 0; m < MMAX; ++m) acc[r][m] = nrt::warp_sum(acc[r][m]);
            // Lane m handles token m (a register select, not dynamic indexing).
            float mine[RPW];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                mine[r] = 0.0f;
#pragma unroll
                for (int m = 0; m < MMAX; ++m)
                    if (m == lane) mine[r] = acc[r][m];
            }
            const bool active = lane < M;
            if (splits == 1) {
                if (active) store(lane, j, mine);
            } else {
                const size_t nrows = (size_t)N * RPW;
                if (active)
#pragma unroll
                    for (int r = 0; r < RPW; ++r)
                        ws[((size_t)split * M + lane) * nrows + j + (size_t)r * N] = mine[r];
                __threadfence();
                __syncwarp();
                int prev = 0;
                if (lane == 0) prev = atomicAdd(&counters[j], 1);
                prev = __shfl_sync(0xffffffffu, prev, 0);
                if (prev == splits - 1) {  // the last split of row j: reduce in split order
                    __threadfence();
                    if (active) {
                        float tot[RPW];
#pragma unroll
                        for (int r = 0; r < RPW; ++r) {
                            tot[r] = 0.0f;
                            for (int s = 0; s < splits; ++s)
                                tot[r] += __ldcg(&ws[((size_t)s * M + lane) * nrows + j + (size_t)r * N]);
                        }
                        store(lane, j, tot);
                    }
                    if (lane == 0) counters[j] = 0;  // ready for the next launch / graph replay
                }
            }
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int m = 0; m < MMAX; ++m) acc[r][m] = 0.0f;
        }

#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) cur[r][u] = nxt[r][u];
        j = jn;
        b = bn;
    }
}

}  // namespace
