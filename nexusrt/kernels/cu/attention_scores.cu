// attention_scores: the h2o twins of the decode rows kernels (attention_decode.cu), which also
// write each key's raw score and each head's final softmax state, and attention_scores_rows,
// which turns them into probabilities summed over the heads and adds them per cache slot. A
// module of their own (decode_attention.cuh says why); launched by kernels/ops/attention_decode.py.
#include "decode_attention.cuh"

// The h2o scores of one rows launch: scores[r][t] += sum over the Hq heads h of
// exp2(s_raw[r][h][t] - max[r][h]) / sum[r][h], for every slot t <= meta[r].slot, i.e. each
// key's softmax probability summed over the heads (the CPU decoder's attend_row). Launched
// after attention_decode_rows_scores_* of each layer, so scores collects the layers too; it
// reads only the per-key workspace, never the KV cache. grid (ceil(s_stride / 128), rows),
// block 128; one thread owns one slot of one row, so the adds need no atomics.
extern "C" __global__ void __launch_bounds__(kThreads) attention_scores_rows(
    const float* __restrict__ s_raw, const float2* __restrict__ s_ml, const int* __restrict__ meta,
    float* __restrict__ scores, int Hq, int s_stride) {
    const long long row = blockIdx.y;
    const int t = blockIdx.x * kThreads + threadIdx.x;
    if (t > meta[4 * row + 1]) return;
    const float* raw = s_raw + row * Hq * s_stride + t;
    const float2* ml = s_ml + row * Hq;
    float p = 0.f;
    for (int h = 0; h < Hq; ++h) {
        const float2 st = ml[h];
        p += exp2f(raw[(long long)h * s_stride] - st.x) / st.y;
    }
    scores[row * s_stride + t] += p;
}

// The scores twins (attention_decode_rows_scores_*) take the rows kernels' arguments plus
// s_raw fp32 [rows][Hq][s_stride], s_ml float2 [rows][Hq] and s_stride (>= every row's slot + 1).
#define NRT_DECODE_ROWS_SCORES(D, GM, EXACT, NAME)                                                  \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, __nv_bfloat16* out, const __nv_bfloat16* k_pool,                            \
        const __nv_bfloat16* v_pool, const int* tables, const int* meta, float* ws_acc,             \
        float2* ws_ml, int* tickets, int Hkv, int G, int max_splits, float scale,                   \
        int table_stride, int fixed_chunk, float* s_raw, float2* s_ml, int s_stride) {              \
        decode_impl<D, GM, EXACT, true, false, __nv_bfloat16, true>(                                \
            q, out, k_pool, v_pool, tables, meta, ws_acc, ws_ml, tickets, Hkv, G, max_splits,       \
            scale, table_stride, fixed_chunk, nullptr, nullptr, s_raw, s_ml, s_stride);             \
    }

NRT_DECODE_ALL_G(64, NRT_DECODE_ROWS_SCORES, attention_decode_rows_scores)
NRT_DECODE_ALL_G(128, NRT_DECODE_ROWS_SCORES, attention_decode_rows_scores)
