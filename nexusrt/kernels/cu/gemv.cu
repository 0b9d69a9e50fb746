// GEMV for decode: y[m, j] = sum_k W[j, k] * xn[m, k] for M <= 8 tokens, bf16 W, fp32 x/y.
//
// Design (memory bound: every byte of W is read exactly once):
// - One warp owns whole output rows (a "task"); lanes stride the row in 16-byte chunks
//   (8 bf16), U chunks per lane per step, and the NEXT step's chunks are loaded before the
//   current ones are multiplied, so up to 2*U independent 16-byte loads per lane are in flight.
// - Blocks are persistent over tasks (grid-stride, grid = resident blocks), so each block
//   stages x once into shared memory. The first step's weight loads are issued BEFORE
//   staging, hiding the staging's L2 round trip behind DRAM latency.
// - Fused input RMSNorm: each block computes rstd over all of x itself (x is a few KB, read
//   from L2) and stages x * rstd * norm_w; no separate norm kernel.
// - Split-K (gridDim.y > 1) where x does not fit in shared memory (the launcher's 96 KB,
//   opted in past 48 KB): partials go to a workspace, a per-row counter elects the LAST warp, which
//   sums the partials in split order (deterministic, no float atomics) and resets the counter.
// - gate_up variant (RPW = 2): a task computes gate row j and up row I + j together and
//   writes silu(gate) * up, so the SiLU*mul pass disappears.
// - VEC = 8 needs K % 8 == 0 (16-byte aligned rows); VEC = 1 is the scalar path for any K.
#include "gemv_body.cuh"

// extern "C" entry points: gemv_m{MMAX}_{rows|gateup}_v{VEC}[_slim]. BOUNDS is the parenthesised
// __launch_bounds__ list; U the 16-byte loads a lane issues per step and row.
#define NRT_GEMV_ENTRY(NAME, BOUNDS, MMAX, RPW, VEC, U)                                         \
    extern "C" __global__ void __launch_bounds__ BOUNDS                                         \
        NAME(float* y, const __nv_bfloat16* W, const float* x, const void* bias,                \
             const float* residual, const float* norm_w, float eps, int M, int N, int K,        \
             float* ws, int* counters, int flags) {                                             \
        gemv_body<MMAX, RPW, VEC, U>(                                                           \
            W, x, norm_w, eps, M, N, K, ws, counters, flags,                                   \
            [N](int j, int r) { return j + r * N; },                                           \
            [=](int m, int j, const float(&v)[RPW]) {                                          \
                y[(size_t)m * N + j] = epilogue<RPW>(v, m, j, N, bias, residual, flags);       \
            });                                                                                \
    }

#define NRT_GEMV(MMAX, RPW, KIND, VEC) \
    NRT_GEMV_ENTRY(gemv_m##MMAX##_##KIND##_v##VEC, (kThreads), MMAX, RPW, VEC, 8 / RPW)

#define NRT_GEMV_ALL(MMAX)             \
    NRT_GEMV(MMAX, 1, rows, 8)         \
    NRT_GEMV(MMAX, 2, gateup, 8)       \
    NRT_GEMV(MMAX, 1, rows, 1)         \
    NRT_GEMV(MMAX, 2, gateup, 1)

NRT_GEMV_ALL(1)
NRT_GEMV_ALL(2)
NRT_GEMV_ALL(4)
NRT_GEMV_ALL(8)

// The slim pair (ops/gemv.py, NEXUSRT_GEMV_SLIM=1; one token, 16-byte loads): fewer loads a step
// (6 a row, 3 a gate_up row and its up row: 78 and 80 registers, no spills, nvcc 13.0 sm_90a)
// so that three blocks fit an SM's 64 K registers: two of a GEMV and one of the kernel after it,
// which can then land and issue its first weight loads before this one's blocks exit. Same
// per-lane order of the chunks as the default entries, so the same sums. Measured slower on the
// H200, with the third slot free or not (kernels/NOTES.md, end of "gemv_ring"): a comparison.
NRT_GEMV_ENTRY(gemv_m1_rows_v8_slim, (kThreads, 3), 1, 1, 8, 6)
NRT_GEMV_ENTRY(gemv_m1_gateup_v8_slim, (kThreads, 3), 1, 2, 8, 3)
