// decode_attention_mma.cuh: the front half of the tensor-core decode attention kernels
// (attention_decode_mma.cu): one split's K/V pages streamed into shared memory with cp.async,
// several pages in flight per warp, and q.K^T and P.V on mma.sync, leaving each warp's softmax
// state (max, sum, unnormalised output) in the shared arrays the CUDA-core kernels also fill, so
// the merge across warps and the split combine (decode_attention.cuh) are shared.
//
// Why: at long context the CUDA-core kernel is limited by instruction issue, not by HBM: each
// token's scores take G shuffle reductions over the lanes of a row, and at ~220 registers only 8
// warps fit an SM to hide them (NOTES_attention.md). Here a warp takes one 16-token page a step,
// whose (page, head) K and V blocks are contiguous 2-4 KiB; the scores of its 16 tokens against
// the group's G query heads are one m16n8k16 tile pair per 16 dims (heads are the M rows, padded
// to 16), P.V the same, so a page costs a few dozen warp instructions instead of several hundred.
//
// Precision: q (fp32, from rope_append) and P (fp32) are each split into bf16 hi + lo halves and
// both halves multiplied (two mmas per product), so the products carry ~16 mantissa bits against
// a bf16 operand that is exact: within fp32-accumulation noise of the CUDA-core kernel.
#pragma once

#include "attn_common.cuh"
#include "mma_common.cuh"

namespace nrt_decode_mma {

using nrt_attn::kNegBig;
using nrt_attn::kPage;

// Pages in flight per warp (the ring's stages): 4 x 4 KiB at D = 64, 3 x 8 KiB at D = 128, so a
// 4-warp block holds 64 / 96 KiB and two blocks fit an SM.
template <int D>
__host__ __device__ constexpr int stages() { return D == 64 ? 4 : 3; }

// Dynamic shared memory of a block of kWarps warps (ops/attention_decode.py mma_shared_bytes).
template <int D, int kWarps>
__host__ __device__ constexpr int ring_bytes() { return kWarps * stages<D>() * 2 * kPage * D * 2; }

// bf16 hi and lo halves of (x0, x1), packed as the two halves of an mma operand register.
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = nrt_mma::pack_bf16(x0 - hf.x, x1 - hf.y);
}

// Tokens start .. end-1 of KV head kvh (start a multiple of kPage): warp w takes the split's
// pages w, w + kWarps, ... and leaves its softmax state for the group's G heads in red_acc[w],
// red_m[w], red_l[w] (exp2 domain, output unnormalised). The ring's copies of the first pages are
// issued before the PDL wait (nrt::pdl_enter, called here), all but the newest row (`newest`,
// which the kernel before this one writes); that row is read after the wait.
// kHost: a table entry ~h (negative) names block h of the host-tier pools k_host / v_host (pinned,
// host-mapped), copied from there by the same cp.async (attn_common.cuh kv_locate's rule), so a
// block gives the same result wherever it lives.
template <int D, int GM, int kWarps, bool kHost = false>
__device__ __forceinline__ void split_state(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                                            const __nv_bfloat16* __restrict__ v_pool,
                                            const int* __restrict__ page_table, int kvh, int Hkv, int G, int start,
                                            int end, int newest, float qscale, float (&red_acc)[kWarps][GM][D],
                                            float (&red_m)[kWarps][GM], float (&red_l)[kWarps][GM],
                                            const __nv_bfloat16* __restrict__ k_host = nullptr,
                                            const __nv_bfloat16* __restrict__ v_host = nullptr) {
    using nrt_mma::cp_async16;
    using nrt_mma::mma_bf16;
    using nrt_mma::smem_addr;
    using nrt_mma::swz;
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static_assert(GM <= 8, "the G heads are the first 8 of the 16 M rows");
    constexpr int S = stages<D>();
    constexpr int kTile = kPage * D;           // elements of one (page, head) K or V block
    constexpr int kRowChunks = D / 8;          // 16-byte chunks per row
    constexpr int kPerLane = kTile / 8 / 32;   // chunks of a block each lane copies
    constexpr int kKK = D / 16;                // k16 slices of q.k
    constexpr int kN = D / 8;                  // n8 tiles of the output
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem_raw) + warp * S * 2 * kTile;
    const int first_page = start / kPage + warp;
    const int npages = (end - start + kPage - 1) / kPage;
    const int n_mine = npages > warp ? (npages - warp + kWarps - 1) / kWarps : 0;

    // Where page pg's (page, head) blocks start: in k_pool / v_pool, or (kHost) the host pools. The
    // sign rule is nrt_attn::kv_locate's at the page's first token; written per page here (calling
    // kv_locate gives the same offsets but other SASS, not yet run on a GPU).
    auto page_src = [&](int pg, const __nv_bfloat16*& kb, const __nv_bfloat16*& vb) {
        long long b = page_table[pg];
        kb = k_pool;
        vb = v_pool;
        if constexpr (kHost) {
            if (b < 0) {
                b = ~b;
                kb = k_host;
                vb = v_host;
            }
        }
        return (b * Hkv + kvh) * kTile;
    };
    // Page i of this warp into ring stage i % S; rows at or past `end` zero-filled (a masked
    // probability, 0, never multiplies garbage). older_only: leave the newest row for later.
    auto copy_page = [&](int i, bool older_only) {
        const int pg = first_page + i * kWarps;
        const __nv_bfloat16 *kb, *vb;
        const long long base = page_src(pg, kb, vb);
        __nv_bfloat16* ks = ring + (i % S) * 2 * kTile;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;  // the block is contiguous: chunk e is elements 8e .. 8e+7
            const int j = e / kRowChunks, col = (e % kRowChunks) * 8;
            const int t = pg * kPage + j;
            if (older_only && t == newest) continue;
            cp_async16(smem_addr(ks + swz<D>(j, col)), kb + base + 8 * e, t < end);
            cp_async16(smem_addr(ks + kTile + swz<D>(j, col)), vb + base + 8 * e, t < end);
        }
    };
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
        if (i < n_mine) copy_page(i, true);
        nrt_mma::cp_async_commit();  // possibly empty: group i is page i
    }
    nrt::pdl_enter();
    // The newest row, if a page copied above holds it: plain loads now that its writer is done
    // (the copies of the pages after the prologue are issued after the wait, so they include it).
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
        const int pg = first_page + i * kWarps;
        if (i >= n_mine || newest / kPage != pg) continue;
        const __nv_bfloat16 *kb, *vb;
        const long long base = page_src(pg, kb, vb);
        __nv_bfloat16* ks = ring + i * 2 * kTile;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int e = lane + 32 * c;
            const int j = e / kRowChunks, col = (e % kRowChunks) * 8;
            if (pg * kPage + j != newest) continue;
            *reinterpret_cast<uint4*>(ks + swz<D>(j, col)) = *reinterpret_cast<const uint4*>(kb + base + 8 * e);
            *reinterpret_cast<uint4*>(ks + kTile + swz<D>(j, col)) = *reinterpret_cast<const uint4*>(vb + base + 8 * e);
        }
    }

    // q of the group as the A operand (rows = heads; rows G.. and 8..15 zero), hi and lo halves,
    // prescaled into the exp2 domain. A register pair [1], [3] holds rows 8..15: always zero.
    const int g = lane >> 2;
    uint32_t qa_hi[kKK][4], qa_lo[kKK][4];
#pragma unroll
    for (int kk = 0; kk < kKK; ++kk) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float2 v = make_float2(0.f, 0.f);
            if (g < G) v = *reinterpret_cast<const float2*>(q + (long long)(kvh * G + g) * D + kk * 16 + h * 8 + (lane & 3) * 2);
            split_pack(v.x * qscale, v.y * qscale, qa_hi[kk][2 * h], qa_lo[kk][2 * h]);
            qa_hi[kk][2 * h + 1] = 0u;
            qa_lo[kk][2 * h + 1] = 0u;
        }
    }

    float o[kN][4];
#pragma unroll
    for (int n = 0; n < kN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run = kNegBig, l_run = 0.f;  // row g's state; l_run is this lane's share of the quad's sum

    for (int i = 0; i < n_mine; ++i) {
        if (i + S - 1 < n_mine) copy_page(i + S - 1, false);
        nrt_mma::cp_async_commit();
        nrt_mma::cp_async_wait<S - 1>();  // page i has landed (this lane's copies) ...
        __syncwarp();                      // ... and every lane's
        const __nv_bfloat16* ks = ring + (i % S) * 2 * kTile;
        const __nv_bfloat16* vs = ks + kTile;
        const int t0 = (first_page + i * kWarps) * kPage;

        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // tokens 0-7, 8-15 of the page
#pragma unroll
        for (int kk = 0; kk < kKK; ++kk) {
            uint32_t b[4];
            nrt_mma::ldmatrix_x4(b, smem_addr(ks + swz<D>((lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8)));
            mma_bf16(s[0], qa_hi[kk], b[0], b[1]);
            mma_bf16(s[0], qa_lo[kk], b[0], b[1]);
            mma_bf16(s[1], qa_hi[kk], b[2], b[3]);
            mma_bf16(s[1], qa_lo[kk], b[2], b[3]);
        }
        // Row g's scores at tokens t0 + 8n + 2(lane & 3) + {0, 1}; the quad holds the page's 16.
        bool ok[2][2];
        float mx = kNegBig;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                ok[n][k] = t0 + 8 * n + 2 * (lane & 3) + k < end;
                if (ok[n][k]) mx = fmaxf(mx, s[n][k]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        const float alpha = exp2f(m_run - m_new);
        m_run = m_new;
        float p[2][2];
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                p[n][k] = ok[n][k] ? exp2f(s[n][k] - m_new) : 0.f;
                sum += p[n][k];
            }
        l_run = l_run * alpha + sum;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
            o[n][0] *= alpha;
            o[n][1] *= alpha;
        }
        // P (row g, the page's 16 tokens) as the A operand of P.V: the S accumulator layout of two
        // n8 tiles is the A layout of one k16 slice; rows 8..15 zero.
        uint32_t pa_hi[4], pa_lo[4];
        split_pack(p[0][0], p[0][1], pa_hi[0], pa_lo[0]);
        split_pack(p[1][0], p[1][1], pa_hi[2], pa_lo[2]);
        pa_hi[1] = pa_hi[3] = pa_lo[1] = pa_lo[3] = 0u;
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
            uint32_t b[4];
            nrt_mma::ldmatrix_x4_trans(
                b, smem_addr(vs + swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, dd * 16 + (lane >> 4) * 8)));
            mma_bf16(o[2 * dd], pa_hi, b[0], b[1]);
            mma_bf16(o[2 * dd], pa_lo, b[0], b[1]);
            mma_bf16(o[2 * dd + 1], pa_hi, b[2], b[3]);
            mma_bf16(o[2 * dd + 1], pa_lo, b[2], b[3]);
        }
        __syncwarp();  // every lane is done with stage i % S before the next trip refills it
    }

    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    if (g < G) {
#pragma unroll
        for (int n = 0; n < kN; ++n) {
            red_acc[warp][g][n * 8 + (lane & 3) * 2] = o[n][0];
            red_acc[warp][g][n * 8 + (lane & 3) * 2 + 1] = o[n][1];
        }
        if ((lane & 3) == 0) {
            red_m[warp][g] = m_run;
            red_l[warp][g] = l_run;
        }
    }
}

}  // namespace nrt_decode_mma
