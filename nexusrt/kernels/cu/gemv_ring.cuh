// gemv_ring.cuh: the one-token decode GEMV with its weights streamed by the bulk-copy engine
// into a shared-memory ring per warp (sm_90+), shared by gemv_ring.cu (rows, gate_up) and
// gemv_rope.cu (the QKV projection with RoPE and the KV append).
//
// Why: in gemv_body the landing buffer of the weight stream is registers, so the bytes in flight
// per SM are capped by the registers of the 2-3 blocks that fit (ncu on the 8B decode GEMVs alone:
// 45-75% of the DRAM peak, a quarter to nearly half of warp time waiting on loads). Here lane 0 of
// each warp issues one cp.async.bulk per row and step (U * 512 bytes, contiguous in the row),
// ``stages`` steps ahead, into the warp's own slots; an mbarrier per slot says when the bytes have
// landed and the lanes read them with LDS.128. Before the PDL wait every warp already has its
// first ``stages`` steps in flight (weights are immutable), not one.
// Measured on the H200 it is slower than gemv_body on every decode shape but two small ones, alone
// and in the decode graph (kernels/NOTES.md, "gemv_ring"), so the launchers take it only when asked.
//
// Tasks, rows and summation order are gemv_body's at M = 1 and no split: task j of warp w is
// j = blockIdx.x * kWarps + w + t * gridDim.x * kWarps, a lane adds chunk (b*U + u)*32 + lane of
// each row in ascending order, the warp's butterfly sums the lanes, and ``store`` gets the same
// sums, so the outputs are bit-identical to gemv_body's.
//
// Shared memory (the launcher's ops/gemv_ring.py ``shared_bytes``): the staged x planes (K * 4
// bytes), then kWarps * stages slots of RPW * U * 512 bytes, then kWarps * stages barriers.
#pragma once

#include "bulk_copy.cuh"
#include "gemv_body.cuh"

#ifdef NRT_HAS_BULK_COPY
namespace {

// Fill one slot with step b of task j: chunks [b*U*32, +U*32) of each of the task's rows.
template <int RPW, int U, class RowOf>
__device__ __forceinline__ void ring_fill(uint4* slot, unsigned long long* bar, const __nv_bfloat16* W, int K,
                                          int nch, int j, int b, RowOf row_of) {
    const int c0 = b * U * 32;
    const unsigned bytes = (unsigned)min(U * 32, nch - c0) * 16u;
    nrt::mbar_arrive_expect_tx(bar, RPW * bytes);
#pragma unroll
    for (int r = 0; r < RPW; ++r)
        nrt::bulk_load_mapped(slot + r * U * 32, W + (size_t)row_of(j, r) * K + (size_t)c0 * 8, bytes, bar);
}

// N tasks of RPW rows of length K (K % 8 == 0); x fp32 [K], normalised inside with kNorm.
// store(0, j, v) on lane 0: task j's RPW sums (the caller's epilogue).
template <int RPW, int U, class RowOf, class Store>
__device__ __forceinline__ void gemv_ring_body(const __nv_bfloat16* __restrict__ W, const float* __restrict__ x,
                                               const float* __restrict__ norm_w, float eps, int N, int K,
                                               int flags, int stages, RowOf row_of, Store store) {
    extern __shared__ float4 smem4[];
    __shared__ float scratch[32];
    __shared__ float rstd[1];
    constexpr int kStep = RPW * U * 32;  // 16-byte chunks in one slot

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nch = K / 8;
    const int nb = (nch + 32 * U - 1) / (32 * U);
    const int stride = gridDim.x * kWarps;
    uint4* rings = reinterpret_cast<uint4*>(smem4 + 2 * nch);
    uint4* ring = rings + (size_t)warp * stages * kStep;
    unsigned long long* bars =
        reinterpret_cast<unsigned long long*>(rings + (size_t)kWarps * stages * kStep) + warp * stages;

    int j = blockIdx.x * kWarps + warp, b = 0;  // the step being summed
    int jf = j, bf = 0;                         // the next step to fill (lane 0's)
    if (lane == 0) {
        for (int s = 0; s < stages; ++s) nrt::mbar_init(&bars[s], 1);
        nrt::mbar_init_fence();
        for (int s = 0; s < stages && jf < N; ++s) {
            ring_fill<RPW, U>(ring + (size_t)s * kStep, &bars[s], W, K, nch, jf, bf, row_of);
            if (++bf == nb) { bf = 0; jf += stride; }
        }
    }
    __syncwarp();
    nrt::pdl_enter();

    stage_x<8>(reinterpret_cast<float*>(smem4), x, norm_w, eps, 1, K, 0, nch, (flags & kNorm) != 0, scratch, rstd);
    const float4* x4 = smem4;  // plane h of chunk c: x4[h * nch + c] (stage_x)

    float acc[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) acc[r] = 0.0f;
    int slot = 0;
    unsigned phase = 0;
    while (j < N) {  // warp-uniform
        nrt::mbar_wait(&bars[slot], phase);
        const uint4* s = ring + (size_t)slot * kStep;
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = (b * U + u) * 32 + lane;
                if (c < nch) acc[r] += nrt::dot8(s[r * U * 32 + u * 32 + lane], x4[c], x4[nch + c]);
            }
        __syncwarp();  // every lane has read the slot before lane 0 refills it
        if (lane == 0 && jf < N) {
            nrt::fence_proxy_async();
            ring_fill<RPW, U>(ring + (size_t)slot * kStep, &bars[slot], W, K, nch, jf, bf, row_of);
            if (++bf == nb) { bf = 0; jf += stride; }
        }
        if (++slot == stages) { slot = 0; phase ^= 1; }
        if (++b == nb) {  // task j complete
            float v[RPW];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                v[r] = nrt::warp_sum(acc[r]);
                acc[r] = 0.0f;
            }
            if (lane == 0) store(0, j, v);
            b = 0;
            j += stride;
        }
    }
}

}  // namespace
#endif  // NRT_HAS_BULK_COPY
