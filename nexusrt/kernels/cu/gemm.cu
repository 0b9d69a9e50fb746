// GEMM for prefill: Y[M, N] = X[M, K] . W[N, K]^T, X fp32, W bf16, fp32 accumulate.
// A plain shared-memory tiled FMA kernel (64x64 outputs per block, 32-wide K steps, 4x4
// outputs per thread): correct for any M, N, K and any alignment; the tensor-core version
// is future work (prefill matters less than decode).
// Epilogues match gemv.cu: + bias (bf16 or fp32), + residual (may alias Y), fused input
// RMSNorm (X row m scaled by rstd[m] * norm_w[k]; rstd from gemm_row_rstd, launched first),
// and gate_up (W = [gate; up] of 2*I rows, Y[M, I] = silu(gate) * up).
#include "common.cuh"

namespace {

constexpr int BM = 64, BN = 64, BK = 32, PAD = BM + 1;  // +1: conflict-free transposed stores
enum : int { kBias = 1, kBiasBf16 = 2, kResidual = 4, kNorm = 8 };

__device__ __forceinline__ float load_bias(const void* bias, int flags, int i) {
    return (flags & kBiasBf16) ? __bfloat162float(((const __nv_bfloat16*)bias)[i]) : ((const float*)bias)[i];
}

// GATE_UP: tile row t < 32 is gate row j0 + t, t >= 32 is up row I + j0 + t - 32, so a
// thread's columns q and q + 2 (tx + 16q, tx + 16q + 32) are a matching gate/up pair.
template <bool GATE_UP>
__device__ __forceinline__ void gemm_body(float* Y, const float* __restrict__ X,
                                          const __nv_bfloat16* __restrict__ W, const void* bias,
                                          const float* residual, const float* __restrict__ norm_w,
                                          const float* __restrict__ rstd, int M, int N, int K,
                                          int flags) {
    __shared__ float Xs[BK][PAD];
    __shared__ float Ws[BK][PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);  // first output column
    const unsigned short* Wb = reinterpret_cast<const unsigned short*>(W);
    const bool norm = (flags & kNorm) != 0;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][q] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int p = 0; p < (BM * BK) / 256; ++p) {
            const int e = tid + 256 * p, row = e / BK, kk = e % BK;
            const int m = m0 + row, k = k0 + kk;
            float v = 0.0f;
            if (m < M && k < K) {
                v = X[(size_t)m * K + k];
                if (norm) v = v * rstd[m] * norm_w[k];
            }
            Xs[kk][row] = v;
            int wrow;
            bool ok;
            if (GATE_UP) {
                const int j = n0 + (row & 31);
                ok = j < N;
                wrow = row < 32 ? j : N + j;
            } else {
                wrow = n0 + row;
                ok = wrow < N;
            }
            Ws[kk][row] = (ok && k < K) ? nrt::bf16_bits_to_float(Wb[(size_t)wrow * K + k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = Xs[kk][ty * 4 + i];
#pragma unroll
            for (int q = 0; q < 4; ++q) b[q] = Ws[kk][tx + 16 * q];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[i][q] = fmaf(a[i], b[q], acc[i][q]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
        if (GATE_UP) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int j = n0 + tx + 16 * q;
                if (j >= N) continue;
                float g = acc[i][q], u = acc[i][q + 2];
                if (flags & kBias) { g += load_bias(bias, flags, j); u += load_bias(bias, flags, N + j); }
                float v = nrt::silu(g) * u;
                if (flags & kResidual) v += residual[(size_t)m * N + j];
                Y[(size_t)m * N + j] = v;
            }
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int n = n0 + tx + 16 * q;
                if (n >= N) continue;
                float v = acc[i][q];
                if (flags & kBias) v += load_bias(bias, flags, n);
                if (flags & kResidual) v += residual[(size_t)m * N + n];  // same thread reads, then writes
                Y[(size_t)m * N + n] = v;
            }
        }
    }
}

}  // namespace

// N is the number of output columns (for gate_up: I; W has 2*I rows). Block 256, grid
// (ceil(N / 64) or ceil(I / 32), ceil(M / 64)).
extern "C" __global__ void __launch_bounds__(256) gemm_rows(float* Y, const float* X, const __nv_bfloat16* W,
                                                            const void* bias, const float* residual,
                                                            const float* norm_w, const float* rstd,
                                                            int M, int N, int K, int flags) {
    gemm_body<false>(Y, X, W, bias, residual, norm_w, rstd, M, N, K, flags);
}

extern "C" __global__ void __launch_bounds__(256) gemm_gateup(float* Y, const float* X, const __nv_bfloat16* W,
                                                              const void* bias, const float* residual,
                                                              const float* norm_w, const float* rstd,
                                                              int M, int N, int K, int flags) {
    gemm_body<true>(Y, X, W, bias, residual, norm_w, rstd, M, N, K, flags);
}

// rstd[m] = 1 / sqrt(mean(X[m, :]^2) + eps), one warp per row (run before a fused-norm GEMM).
extern "C" __global__ void gemm_row_rstd(float* rstd, const float* X, int M, int K, float eps) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= M) return;
    const float* xr = X + (size_t)m * K;
    float ss = 0.0f;
    for (int k = lane; k < K; k += 32) ss = fmaf(xr[k], xr[k], ss);
    ss = nrt::warp_sum(ss);
    if (lane == 0) rstd[m] = 1.0f / sqrtf(ss / (float)K + eps);
}
