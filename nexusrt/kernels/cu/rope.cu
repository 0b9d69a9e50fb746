// rope_append: the step between the fused QKV GEMV and attention.
//
// For each of M rows (token positions *pos + m) of qkv fp32 [M, (Hq + 2*Hkv) * D]:
//   q heads: optional per-head RMSNorm (Qwen3 q_norm), RoPE, written to q_out fp32 [M, Hq, D];
//   k heads: optional per-head RMSNorm (k_norm), RoPE, written as bf16 into the paged k_pool;
//   v heads: written as bf16 into the paged v_pool.
// The rows variant (rope_append_rows_d<D>, the batched step of many sequences) reads each
// row's RoPE position, cache slot and block-table row from meta int32 [M, 4] = (position,
// slot, table row, unused) and its table from tables int32 [*, table_stride]; the plain one
// has position = slot = *pos + m and one table.
// One warp per (row, head): a head row is D <= 256 floats, so the norm is one warp reduction
// and each lane owns the rotate_half pairs (j, j + D/2) for j = lane, lane + 32, ...
// The norm and the rotation are nrt_attn::norm_rope_head (attn_common.cuh).
#include "attn_common.cuh"

namespace {

constexpr int kWarps = 4;  // heads per block

// kHost: the table may name host-tier blocks (attn_common.cuh kv_locate); their rows are
// written zero-copy into k_host / v_host (pinned host memory), so a prompt longer than the
// device budget is appended without a demotion copy. The kHost = false kernels ignore them.
template <int D, bool kRows, bool kHost>
__device__ __forceinline__ void rope_append_impl(
    const float* __restrict__ qkv, float* __restrict__ q_out, __nv_bfloat16* __restrict__ k_pool,
    __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ page_table, const int* __restrict__ pos,
    const float* __restrict__ inv_freq, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    float eps, int M, int Hq, int Hkv, int table_stride, __nv_bfloat16* __restrict__ k_host,
    __nv_bfloat16* __restrict__ v_host) {
    static_assert(D % 64 == 0, "head_dim must be a multiple of 64");
    nrt::pdl_enter();  // qkv comes from the kernel before (see pdl.cuh)
    constexpr int kHalf = D / 2;
    constexpr int kPairs = kHalf / 32;  // rotate_half pairs per lane

    const int lane = threadIdx.x & 31;
    const int head = blockIdx.x * kWarps + (threadIdx.x >> 5);  // 0 .. Hq + 2*Hkv - 1
    const int m = blockIdx.y;
    const int heads = Hq + 2 * Hkv;
    if (head >= heads || m >= M) return;

    int t, slot;  // RoPE position and cache slot of this row
    if (kRows) {
        const int* meta = pos + 4 * m;
        t = meta[0];
        slot = meta[1];
        page_table += (long long)meta[2] * table_stride;
    } else {
        t = slot = *pos + m;
    }
    const float* src = qkv + (long long)m * heads * D + (long long)head * D;

    float x1[kPairs], x2[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
        x1[k] = src[lane + 32 * k];
        x2[k] = src[kHalf + lane + 32 * k];
    }

    const bool is_q = head < Hq;
    const bool is_k = !is_q && head < Hq + Hkv;
    if (is_q || is_k)
        nrt_attn::norm_rope_head<D>(x1, x2, is_q ? q_norm : k_norm, eps, t, inv_freq, lane);

    if (is_q) {
        float* dst = q_out + ((long long)m * Hq + head) * D;
#pragma unroll
        for (int k = 0; k < kPairs; ++k) {
            dst[lane + 32 * k] = x1[k];
            dst[kHalf + lane + 32 * k] = x2[k];
        }
        return;
    }
    const int kvh = is_k ? head - Hq : head - Hq - Hkv;
    __nv_bfloat16 *kb = k_pool, *vb = v_pool;
    const long long off = nrt_attn::kv_locate<kHost>(page_table, slot, kvh, Hkv, D, kb, vb, k_host, v_host);
    __nv_bfloat16* dst = (is_k ? kb : vb) + off;
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
        dst[lane + 32 * k] = __float2bfloat16_rn(x1[k]);
        dst[kHalf + lane + 32 * k] = __float2bfloat16_rn(x2[k]);
    }
}

}  // namespace

// grid (ceil((Hq + 2*Hkv) / 4), M), block 128. The _host twin takes k_host, v_host at the end
// (one-sequence only: the batched engine has no host tier, so the rows kernel has no twin).
#define NRT_ROPE_APPEND_KIND(D, HOST, SUFFIX, HOST_PARAMS, HOST_ARGS)                               \
    extern "C" __global__ void __launch_bounds__(kWarps * 32) rope_append##SUFFIX##_d##D(           \
        const float* qkv, float* q_out, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,               \
        const int* page_table, const int* pos, const float* inv_freq, const float* q_norm,          \
        const float* k_norm, float eps, int M, int Hq, int Hkv HOST_PARAMS) {                       \
        rope_append_impl<D, false, HOST>(qkv, q_out, k_pool, v_pool, page_table, pos, inv_freq,     \
                                         q_norm, k_norm, eps, M, Hq, Hkv, 0, HOST_ARGS);            \
    }

#define NRT_ROPE_APPEND_ROWS(D)                                                                     \
    extern "C" __global__ void __launch_bounds__(kWarps * 32) rope_append_rows_d##D(                \
        const float* qkv, float* q_out, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,               \
        const int* tables, const int* meta, const float* inv_freq, const float* q_norm,             \
        const float* k_norm, float eps, int M, int Hq, int Hkv, int table_stride) {                 \
        rope_append_impl<D, true, false>(qkv, q_out, k_pool, v_pool, tables, meta, inv_freq, q_norm, \
                                         k_norm, eps, M, Hq, Hkv, table_stride, nullptr, nullptr);  \
    }

#define NRT_NO_HOST_ARGS nullptr, nullptr
#define NRT_HOST_PARAMS , __nv_bfloat16 *k_host, __nv_bfloat16 *v_host
#define NRT_HOST_ARGS k_host, v_host
#define NRT_ROPE_APPEND(D)                                                                          \
    NRT_ROPE_APPEND_KIND(D, false, , , NRT_NO_HOST_ARGS)                                            \
    NRT_ROPE_APPEND_ROWS(D)                                                                         \
    NRT_ROPE_APPEND_KIND(D, true, _host, NRT_HOST_PARAMS, NRT_HOST_ARGS)

NRT_ROPE_APPEND(64)
NRT_ROPE_APPEND(128)
NRT_ROPE_APPEND(256)
