// gemv_qkv_rope_d<D>: the decode step's QKV projection with RoPE and the KV append in its
// epilogue, so the one-sequence step needs no rope_append launch between the GEMV and attention.
//
// One token (M = 1). W is the fused [(Hq + 2*Hkv) * D, K] QKV weight; x is normalised inside
// (the input RMSNorm, flag kNorm), as in gemv.cu. A task is a rotate_half pair of one head:
// rows h*D + j and h*D + j + D/2 (j < D/2) are summed together by one warp (RPW = 2, the gate_up
// kind's loop with another row map), so the lane that finishes the task holds both halves of
// the pair and rotates them itself with nrt_attn::rope_pair, the rotation rope_append applies:
//   q heads (h < Hq): RoPE, written to q_out fp32 [Hq, D];
//   k heads: RoPE, written as bf16 into the paged k_pool at slot *pos;
//   v heads: written as bf16 into v_pool.
// Every sum, bias add and rotation is the same fp32 arithmetic in the same order as the gemv
// rows kind followed by rope_append, so the outputs are bit-identical to the two launches.
// Not covered (the launcher's caller keeps the two launches): per-head q/k RMSNorm (Qwen3: a
// head-wide reduction), the host KV tier, split-K (x larger than shared memory).
#include "attn_common.cuh"
#include "gemv_body.cuh"

namespace {

template <int D>
struct RopeStore {
    const float* inv_freq;  // [D/2], RoPE scaling folded in
    const int* pos;         // the token's position = its cache slot
    const int* page_table;  // logical block -> physical block
    float* q_out;
    __nv_bfloat16* k_pool;
    __nv_bfloat16* v_pool;
    const void* bias;  // [(Hq + 2*Hkv) * D] or null (flags say its dtype)
    int flags, Hq, Hkv;

    static constexpr int kHalf = D / 2;

    __device__ __forceinline__ int row_of(int j, int r) const {
        return (j / kHalf) * D + j % kHalf + r * kHalf;
    }

    __device__ __forceinline__ void operator()(int, int j, const float (&v)[2]) const {
        const int head = j / kHalf, i = j % kHalf, row = head * D + i;
        float a = v[0], b = v[1];
        if (flags & kBias) {
            a += bias_at(bias, flags, row);
            b += bias_at(bias, flags, row + kHalf);
        }
        const int t = *pos;
        if (head < Hq + Hkv) nrt_attn::rope_pair(a, b, t, inv_freq[i]);
        if (head < Hq) {
            q_out[row] = a;
            q_out[row + kHalf] = b;
            return;
        }
        const bool is_k = head < Hq + Hkv;
        const int kvh = head - Hq - (is_k ? 0 : Hkv);
        __nv_bfloat16* dst = (is_k ? k_pool : v_pool) + nrt_attn::kv_offset(page_table, t, kvh, Hkv, D);
        dst[i] = __float2bfloat16_rn(a);
        dst[i + kHalf] = __float2bfloat16_rn(b);
    }
};

}  // namespace

// grid (resident blocks, 1), block kThreads, dynamic shared memory K * 4 bytes (the staged x).
// Two depths of the same loop: gemv_qkv_rope_d<D> keeps U = 4 loads per row in flight (104
// registers: two blocks per SM), gemv_qkv_rope_u2_d<D> keeps U = 2 and is held to three blocks
// per SM (80 registers), for shapes whose pair tasks would otherwise take two waves of warps
// (the 8B: 3,072 tasks against 2,112 resident warps at U = 4, 3,168 at U = 2). The launcher
// picks (ops/qkv_rope.py); both give the same sums (see gemv_body).
#define NRT_GEMV_QKV_ROPE(NAME, D, U, BOUNDS)                                                      \
    extern "C" __global__ void __launch_bounds__ BOUNDS NAME(                                      \
        const __nv_bfloat16* W, const float* x, const void* bias, const float* norm_w, float eps,  \
        int K, int flags, const float* inv_freq, const int* pos, const int* page_table,            \
        float* q_out, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int Hq, int Hkv) {             \
        const RopeStore<D> st{inv_freq, pos, page_table, q_out, k_pool, v_pool, bias, flags, Hq, Hkv}; \
        gemv_body<1, 2, 8, U>(W, x, norm_w, eps, 1, (Hq + 2 * Hkv) * (D / 2), K, nullptr, nullptr, flags, \
                              [st](int j, int r) { return st.row_of(j, r); }, st);                 \
    }

// BOUNDS is (kThreads) alone for the deep variant: naming a minimum of one block per SM
// changes nvcc 13.0's allocation (104 -> 124 registers).
NRT_GEMV_QKV_ROPE(gemv_qkv_rope_d64, 64, 4, (kThreads))
NRT_GEMV_QKV_ROPE(gemv_qkv_rope_d128, 128, 4, (kThreads))
NRT_GEMV_QKV_ROPE(gemv_qkv_rope_u2_d64, 64, 2, (kThreads, 3))
NRT_GEMV_QKV_ROPE(gemv_qkv_rope_u2_d128, 128, 2, (kThreads, 3))

// The same fused kernel with the weights streamed by the bulk-copy engine (gemv_ring.cuh), for
// sm_90+: one block per SM, ``stages`` slots of 2 rows x 2 KB per warp; same bits as above.
#include "gemv_ring.cuh"
#ifdef NRT_HAS_BULK_COPY
#define NRT_GEMV_QKV_ROPE_RING(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(kThreads, 1) gemv_qkv_rope_ring_d##D(                   \
        const __nv_bfloat16* W, const float* x, const void* bias, const float* norm_w, float eps,  \
        int K, int flags, const float* inv_freq, const int* pos, const int* page_table,            \
        float* q_out, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, int Hq, int Hkv, int stages) { \
        const RopeStore<D> st{inv_freq, pos, page_table, q_out, k_pool, v_pool, bias, flags, Hq, Hkv}; \
        gemv_ring_body<2, 4>(W, x, norm_w, eps, (Hq + 2 * Hkv) * (D / 2), K, flags, stages,         \
                             [st](int j, int r) { return st.row_of(j, r); }, st);                  \
    }

NRT_GEMV_QKV_ROPE_RING(64)
NRT_GEMV_QKV_ROPE_RING(128)
#endif
