// Helpers shared by the attention-side kernels (rope_append, attention_decode,
// attention_prefill): the paged KV-cache addressing, 16-byte bf16 row loads and warp
// reductions. Sampling does not need it.
//
// Paged KV cache (KERNELS.md): one pool per layer, k_pool[num_pages][Hkv][P][D] bf16 and
// v_pool alike; page_table[logical page] -> physical page. Token t of a sequence lives in
// page page_table[t / P], slot t % P.
#pragma once

#include "pdl.cuh"

#include <cuda_bf16.h>
#include <cuda/std/cstdint>

// The page size normally comes from common.cuh (owned by the GEMV/elementwise kernels);
// the guard lets these sources compile alone and agree with it when both are included.
#ifndef NRT_PAGE_SIZE
#define NRT_PAGE_SIZE 16
#endif

namespace nrt_attn {

constexpr int kPage = NRT_PAGE_SIZE;
static_assert((kPage & (kPage - 1)) == 0, "the page size must be a power of two");

// Element offset of (token t, kv head h, dim 0) in a pool: 64-bit, because a pool of an
// 8B model at long context passes 2**31 elements.
__device__ __forceinline__ long long kv_offset(const int* __restrict__ page_table, int t, int h,
                                               int num_kv_heads, int head_dim) {
    const long long page = page_table[t / kPage];
    return ((page * num_kv_heads + h) * kPage + (t % kPage)) * (long long)head_dim;
}

// The host tier (kvcache/tiers.py): a table entry b >= 0 names device block b of the device
// pools; b < 0 names host block ~b (= -(b + 1)) of the host pools, pinned host memory the
// kernel reads (and rope_append writes) zero-copy through its unified address. The sign test
// and one NOT are the whole cost; a device-only kernel (kHost false) compiles to exactly the
// kv_offset code above and never looks at the host bases.
// Returns the element offset inside the pool the entry names, and points k_base / v_base at
// the host pools when that pool is the host one (left as they are otherwise).
template <bool kHost, typename T>
__device__ __forceinline__ long long kv_locate(const int* __restrict__ page_table, int t, int h,
                                               int num_kv_heads, int head_dim, T*& k_base,
                                               T*& v_base, T* k_host, T* v_host) {
    if constexpr (!kHost) {
        return kv_offset(page_table, t, h, num_kv_heads, head_dim);
    } else {
        const int b = page_table[t / kPage];
        const bool host = b < 0;
        const long long page = host ? ~b : b;
        if (host) {
            k_base = k_host;
            v_base = v_host;
        }
        return ((page * num_kv_heads + h) * kPage + (t % kPage)) * (long long)head_dim;
    }
}

// 8 bf16 held in 16 bytes (one vector load) as floats.
__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float out[8]) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// 8 consecutive bf16 (one 16-byte load; the address must be 16-byte aligned) as floats.
__device__ __forceinline__ void load_bf16x8(const __nv_bfloat16* __restrict__ src, float out[8]) {
    bf16x8_to_float(*reinterpret_cast<const uint4*>(src), out);
}

// Sum over groups of `width` adjacent lanes (width a power of two <= 32).
template <int width>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

template <int width>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int off = width / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// A finite "minus infinity" for running maxima: exp(kNegBig - kNegBig) is 1, not NaN, so
// merging two empty softmax states stays well defined (their sums are 0 anyway).
constexpr float kNegBig = -1.0e30f;
constexpr float kLog2e = 1.4426950408889634f;

// An empty online-softmax state for GM heads: max kNegBig, sum 0, output 0.
template <int GM>
__device__ __forceinline__ void empty_state(float (&m)[GM], float (&l)[GM], float (&acc)[GM][8]) {
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = kNegBig;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    }
}

// One query head's 8 dims of this lane (two float4), times qscale (the softmax scale times
// log2(e): scores in the exp2 domain).
__device__ __forceinline__ void scaled_q(const float4 a, const float4 b, float qscale, float (&qr)[8]) {
    qr[0] = a.x * qscale; qr[1] = a.y * qscale; qr[2] = a.z * qscale; qr[3] = a.w * qscale;
    qr[4] = b.x * qscale; qr[5] = b.y * qscale; qr[6] = b.z * qscale; qr[7] = b.w * qscale;
}

// The scores of kUnroll K rows (8 bf16 of each per lane, a row spread over kRowLanes lanes)
// against the first G of GM query heads held as qr (prescaled into the exp2 domain): s[u][g],
// every lane of a row group holding its row's sums. Heads g >= G are left unset.
template <int GM, int kUnroll, int kRowLanes>
__device__ __forceinline__ void row_scores(const uint4 (&kraw)[kUnroll], const float (&qr)[GM][8],
                                           float (&s)[kUnroll][GM], int G) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        float kf[8];
        bf16x8_to_float(kraw[u], kf);
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g >= G) break;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qr[g][i] * kf[i];
            s[u][g] = group_sum<kRowLanes>(dot);
        }
    }
}

// One online-softmax step of the first G heads over kUnroll rows (exp2 domain): the running
// max m, sum l and output acc (8 dims per lane) rescaled to the new max, then the rows' weights
// (0 for a row past the end) and their V rows (8 bf16 per lane) added. s is overwritten with
// the weights.
template <int GM, int kUnroll>
__device__ __forceinline__ void online_softmax_step(float (&s)[kUnroll][GM], const bool (&valid)[kUnroll],
                                                    const uint4 (&vraw)[kUnroll], float (&m)[GM], float (&l)[GM],
                                                    float (&acc)[GM][8], int G) {
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g >= G) break;
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) mx = valid[u] ? fmaxf(mx, s[u][g]) : mx;
        const float alpha = exp2f(m[g] - mx);
        m[g] = mx;
        l[g] *= alpha;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) s[u][g] = valid[u] ? exp2f(s[u][g] - mx) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        float vf[8];
        bf16x8_to_float(vraw[u], vf);
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g >= G) break;
            l[g] += s[u][g];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] += s[u][g] * vf[i];
        }
    }
}

// Merge softmax state (m_o, l_o, acc_o) of the lane `off` away into (m, l, acc); all in the
// exp2 domain. Shared by attention_decode.cu and persistent_decode.cuh.
template <int GM>
__device__ __forceinline__ void merge_state(float (&m)[GM], float (&l)[GM], float (&acc)[GM][8], int off,
                                            int G) {
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g >= G) break;
        const float m_o = __shfl_xor_sync(0xffffffffu, m[g], off);
        const float l_o = __shfl_xor_sync(0xffffffffu, l[g], off);
        const float m_n = fmaxf(m[g], m_o);
        const float a = exp2f(m[g] - m_n), b = exp2f(m_o - m_n);
        l[g] = l[g] * a + l_o * b;
        m[g] = m_n;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float acc_o = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
            acc[g][i] = acc[g][i] * a + acc_o * b;
        }
    }
}

// RoPE (rotate_half) of one pair (x1 = dim j, x2 = dim j + D/2) at position t, inv_freq[j] given.
// The one rotation both rope_append and the fused QKV GEMV (gemv_rope.cu) apply.
__device__ __forceinline__ void rope_pair(float& x1, float& x2, int t, float inv_freq_j) {
    const float freq = (float)t * inv_freq_j;
    float s, c;
    sincosf(freq, &s, &c);
    const float a = x1, b = x2;
    // Rounding pinned with intrinsics (one rounded product, one fma each): left to contraction,
    // the compiler fused these differently in different kernels (d128: 1-ulp differences).
    x1 = __fmaf_rn(a, c, -__fmul_rn(b, s));  // out[:D/2] = x1*cos - x2*sin
    x2 = __fmaf_rn(b, c, __fmul_rn(a, s));   // out[D/2:] = x2*cos + x1*sin
}

// One head row of D floats held by a warp as rotate_half pairs: lane owns x1[k] = x[lane + 32k]
// and x2[k] = x[D/2 + lane + 32k]. Optional per-head RMSNorm (Qwen3 q_norm / k_norm; w null:
// none), then RoPE at position t. The angle is computed like HF: freq = float(t) * inv_freq[j]
// in fp32, then sincosf (accurate for the large arguments of long contexts). Shared by
// rope.cu and persistent_decode.cuh so both compute the same bits.
template <int D>
__device__ __forceinline__ void norm_rope_head(float (&x1)[D / 64], float (&x2)[D / 64], const float* w,
                                               float eps, int t, const float* __restrict__ inv_freq,
                                               int lane) {
    constexpr int kHalf = D / 2, kPairs = D / 64;
    if (w != nullptr) {
        // HF RMSNorm in fp32: x * rsqrt(mean(x^2) + eps), then times the weight.
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < kPairs; ++k) ss += x1[k] * x1[k] + x2[k] * x2[k];
        ss = group_sum<32>(ss);
        const float r = rsqrtf(ss / (float)D + eps);
#pragma unroll
        for (int k = 0; k < kPairs; ++k) {
            x1[k] = (x1[k] * r) * w[lane + 32 * k];
            x2[k] = (x2[k] * r) * w[kHalf + lane + 32 * k];
        }
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) rope_pair(x1[k], x2[k], t, inv_freq[lane + 32 * k]);
}

}  // namespace nrt_attn
