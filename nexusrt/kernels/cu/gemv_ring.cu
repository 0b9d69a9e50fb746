// gemv_ring_{rows|gateup}: the one-token decode GEMV (gemv.cu's rows and gate_up kinds at M = 1,
// unsplit) with its weights streamed into a shared-memory ring by the bulk-copy engine
// (gemv_ring.cuh says why and how). Same arguments as gemv_m1_{rows|gateup}_v8 without the
// split-K workspace, plus ``stages`` (slots per warp); the same bits as those kernels.
// grid (resident blocks: one per SM at the most slots, more with fewer), block kThreads, dynamic
// shared memory K * 4 + kWarps * stages * (RPW * U * 512 + 8) bytes (ops/gemv_ring.py).
// sm_90+ only: on older parts the module has no entry points and the launcher never asks.
#include "gemv_ring.cuh"

#ifdef NRT_HAS_BULK_COPY
// RPW * U = 8: each warp's slot is 4 KB whatever the kind.
#define NRT_GEMV_RING(KIND, RPW, U)                                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                          \
        gemv_ring_##KIND(float* y, const __nv_bfloat16* W, const float* x, const void* bias,          \
                         const float* residual, const float* norm_w, float eps, int N, int K, int flags, \
                         int stages) {                                                                 \
        gemv_ring_body<RPW, U>(                                                                        \
            W, x, norm_w, eps, N, K, flags, stages, [N](int j, int r) { return j + r * N; },          \
            [=](int m, int j, const float(&v)[RPW]) {                                                  \
                y[j] = epilogue<RPW>(v, m, j, N, bias, residual, flags);                               \
            });                                                                                        \
    }

NRT_GEMV_RING(rows, 1, 8)
NRT_GEMV_RING(gateup, 2, 4)
#endif
