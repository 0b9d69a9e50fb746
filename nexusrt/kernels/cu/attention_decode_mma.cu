// attention_decode_mma: the one-sequence decode attention kernels (attention_decode.cu) with each
// split's tokens read and multiplied by decode_attention_mma.cuh: every warp streams its own 16-token
// pages of K and V into a ring in shared memory with cp.async (several pages in flight), and q.K^T
// and P.V run on mma.sync (bf16 hi + lo halves of q and P, fp32 accumulate). The split plan, the
// merge across warps and the combine across splits are the plain kernels' (decode_attention.cuh,
// kMma), with a loop step of kWarps pages (64 tokens). No h2o scores. A module of its own so the
// other kernels' machine code stays as it was.
//
// Same arguments as attention_decode_d<D>_g<G> (attention_decode_mma_rows_*: as
// attention_decode_rows_*, grid (Hkv, max_splits, rows); attention_decode_mma_host_* and
// attention_decode_mma_host_fault_*: as the host-tier twins attention_decode_host_*, a block copied
// from the host pools by the same cp.async, so its result does not depend on the tier);
// grid (Hkv, max_splits), block 128,
// dynamic shared memory nrt_decode_mma::ring_bytes<D, 4>() (64 KiB at D = 64, 96 KiB at D = 128).
#include "decode_attention.cuh"

#define NRT_DECODE_MMA(D, GM, EXACT, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, float* ws_acc, float2* ws_ml, int* tickets, int Hkv, \
        int G, int max_splits, float scale) {                                                       \
        decode_impl<D, GM, EXACT, false, false, float, false, false, false, true>(                  \
            q, out, k_pool, v_pool, page_table, pos, ws_acc, ws_ml, tickets, Hkv, G, max_splits,    \
            scale, 0, 0, nullptr, nullptr);                                                         \
    }

NRT_DECODE_ALL_G(64, NRT_DECODE_MMA, attention_decode_mma)
NRT_DECODE_ALL_G(128, NRT_DECODE_MMA, attention_decode_mma)

#define NRT_DECODE_MMA_ROWS(D, GM, EXACT, NAME)                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, __nv_bfloat16* out, const __nv_bfloat16* k_pool,                            \
        const __nv_bfloat16* v_pool, const int* tables, const int* meta, float* ws_acc,             \
        float2* ws_ml, int* tickets, int Hkv, int G, int max_splits, float scale,                   \
        int table_stride, int fixed_chunk) {                                                        \
        decode_impl<D, GM, EXACT, true, false, __nv_bfloat16, false, false, false, true>(           \
            q, out, k_pool, v_pool, tables, meta, ws_acc, ws_ml, tickets, Hkv, G, max_splits,       \
            scale, table_stride, fixed_chunk, nullptr, nullptr);                                    \
    }

NRT_DECODE_ALL_G(64, NRT_DECODE_MMA_ROWS, attention_decode_mma_rows)
NRT_DECODE_ALL_G(128, NRT_DECODE_MMA_ROWS, attention_decode_mma_rows)

NRT_DECODE_HOST_TWINS(attention_decode_mma, MMA)
