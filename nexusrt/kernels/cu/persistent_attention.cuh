// Decode attention tiles of the persistent kernel: one part of one KV head's keys, and the
// combine of a head's parts. The arithmetic is attention_decode.cu's: q prescaled by
// scale * log2(e) so scores live in the exp2 domain, the D/8 lanes of a row group read one K
// (or V) row in 16-byte loads, every row group keeps an online softmax over its tokens, the
// states merge across lanes (merge_state) and then across warps in shared memory; parts are
// combined with weights exp2(m_p - max) / sum as its last-block combine does.
//
// The split is interpret.py's: the query at position pos sees keys 0..pos (n = pos + 1, no
// sliding window); part p of S covers keys [p * ceil(n/S), (p+1) * ceil(n/S)) ∩ [0, n); an
// empty part leaves (m, l, acc) = (kNegBig, 0, 0), which the combine weighs 0. With S == 1 the
// tile writes the normalised output itself.
#pragma once

#include "persistent_tiles.cuh"

namespace nrt_pk {

template <int D, int GM>
struct AttnShared {
    float acc[kWarps][GM][D];
    float m[kWarps][GM], l[kWarps][GM];
    float weight[kMaxSplits][GM];
};

template <int D, int GM>
__device__ __forceinline__ void attention_tile(AttnShared<D, GM>& sh, const float* q, float* out, float* part_acc,
                                               float2* part_ml, const __nv_bfloat16* k_pool,
                                               const __nv_bfloat16* v_pool, const int* table, int pos, int kv,
                                               int part, int S, int Hkv, int G, float scale) {
    using nrt_attn::kNegBig;
    constexpr int kRowLanes = D / 8, kRowGroups = kThreads / kRowLanes;
    constexpr int kUnroll = GM <= 4 ? 2 : 1;  // rows per row group in flight (registers bound it at GM 8)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rg = tid / kRowLanes, dim0 = (tid % kRowLanes) * 8;
    const int n = pos + 1, chunk = (n + S - 1) / S;
    const int start = min(part * chunk, n), end = min(start + chunk, n);

    float qr[GM][8];
    const float qscale = scale * nrt_attn::kLog2e;
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        const int gg = g < G ? g : 0;  // heads past the group: a copy of head 0, never used
        const float4 a = ldcg4(q + (size_t)(kv * G + gg) * D + dim0), b = ldcg4(q + (size_t)(kv * G + gg) * D + dim0 + 4);
        nrt_attn::scaled_q(a, b, qscale, qr[g]);
    }
    float m[GM], l[GM], acc[GM][8];
    nrt_attn::empty_state<GM>(m, l, acc);

    for (int base = start; base < end; base += kRowGroups * kUnroll) {
        uint4 kraw[kUnroll], vraw[kUnroll];
        bool valid[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // every load of the step before any use
            const int t = base + u * kRowGroups + rg;
            valid[u] = t < end;
            kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
            if (valid[u]) {  // L2 loads: the newest row was written by another CTA this launch
                const long long off = nrt_attn::kv_offset(table, t, kv, Hkv, D) + dim0;
                kraw[u] = __ldcg(reinterpret_cast<const uint4*>(k_pool + off));
                vraw[u] = __ldcg(reinterpret_cast<const uint4*>(v_pool + off));
            }
        }
        float s[kUnroll][GM];  // all GM heads (those past G copy head 0 and are never used)
        nrt_attn::row_scores<GM, kUnroll, kRowLanes>(kraw, qr, s, GM);
        nrt_attn::online_softmax_step<GM, kUnroll>(s, valid, vraw, m, l, acc, GM);
    }

#pragma unroll
    for (int off = kRowLanes; off < 32; off *= 2) nrt_attn::merge_state<GM>(m, l, acc, off, GM);
    if (lane < kRowLanes) {
#pragma unroll
        for (int g = 0; g < GM; ++g)
#pragma unroll
            for (int i = 0; i < 8; ++i) sh.acc[warp][g][dim0 + i] = acc[g][i];
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GM; ++g) { sh.m[warp][g] = m[g]; sh.l[warp][g] = l[g]; }
    }
    nrt::block_sync();
    for (int idx = tid; idx < G * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        float mx = kNegBig;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sh.m[w][g]);
        float sum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float c = exp2f(sh.m[w][g] - mx);
            sum += sh.l[w][g] * c;
            a += sh.acc[w][g][d] * c;
        }
        if (S == 1) {
            out[(size_t)(kv * G + g) * D + d] = a / sum;
        } else {
            const size_t slot = ((size_t)kv * S + part) * G + g;
            part_acc[slot * D + d] = a;
            if (d == 0) part_ml[slot] = make_float2(mx, sum);
        }
    }
}

// Combine the S parts of KV head kv into out (its G heads of D), attention_decode.cu's combine.
template <int D, int GM>
__device__ __forceinline__ void combine_tile(AttnShared<D, GM>& sh, float* out, const float* part_acc,
                                             const float2* part_ml, int kv, int S, int G) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int g = warp; g < G; g += kWarps) {
        const size_t row = (size_t)kv * S * G + g;
        float mx = nrt_attn::kNegBig;
        for (int sp = lane; sp < S; sp += 32) mx = fmaxf(mx, __ldcg(part_ml + row + (size_t)sp * G).x);
        mx = nrt_attn::group_max<32>(mx);
        float sum = 0.f;
        for (int sp = lane; sp < S; sp += 32) {
            const float2 ml = __ldcg(part_ml + row + (size_t)sp * G);
            const float c = exp2f(ml.x - mx);
            sh.weight[sp][g] = c;
            sum += ml.y * c;
        }
        sum = nrt_attn::group_sum<32>(sum);
        __syncwarp();
        for (int sp = lane; sp < S; sp += 32) sh.weight[sp][g] /= sum;
    }
    nrt::block_sync();
    for (int idx = tid; idx < G * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        const float* src = part_acc + ((size_t)kv * S * G + g) * D + d;
        float a = 0.f;
        for (int sp = 0; sp < S; ++sp) a += sh.weight[sp][g] * __ldcg(src + (size_t)sp * G * D);
        out[(size_t)(kv * G + g) * D + d] = a;
    }
}

}  // namespace nrt_pk
