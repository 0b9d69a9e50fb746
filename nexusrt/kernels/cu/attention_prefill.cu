// attention_prefill: causal GQA attention for M query rows at positions start .. start+M-1
// (start = *pos, read on the device) against keys 0 .. start+M-1 in the paged bf16 cache
// (rope_append has already appended this chunk's K and V). q fp32 [M, Hq, D] -> out fp32
// [M, Hq*D]. Chunked prefill works because each row's causal limit is start + m.
//
// Flash-style, fp32 math on CUDA cores (correct first; prompts are short next to decode):
// a block owns 16 "virtual rows" (m, g) of ONE KV head — the G query heads of the group
// for consecutive m — so every K/V tile loaded into shared memory serves all heads of the
// group. Keys stream through in tiles of 32 with an online softmax. Thread layout: row
// i = tid / 8, and the 8 lanes of a row split the tile's columns (scores) and the head dims
// (output), so a row's running max and sum stay in registers of the same 8 lanes.
#include "attn_common.cuh"

namespace {

using nrt_attn::kNegBig;

constexpr int kThreads = 128;
constexpr int kRows = 16;        // virtual rows per block
constexpr int kTile = 32;        // keys per tile
constexpr int kLanesPerRow = 8;  // kThreads / kRows
constexpr int kColsPerLane = kTile / kLanesPerRow;

template <int D>
__device__ __forceinline__ void prefill_impl(
    const float* __restrict__ q, float* __restrict__ out, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ page_table, const int* __restrict__ pos,
    int M, int Hq, int Hkv, float scale) {
    static_assert(D % 8 == 0 && D <= 128, "prefill supports head_dim up to 128 (shared memory)");
    constexpr int kDimsPerLane = D / kLanesPerRow;
    constexpr int kVecPerRow = D / 8;  // 16-byte vectors per K/V row

    __shared__ float Qs[kRows][D];
    __shared__ float Ks[kTile][D + 1];  // +1: the 8 column lanes of a row hit 8 banks
    __shared__ float Vs[kTile][D];
    __shared__ float Ps[kRows][kTile];

    const int G = Hq / Hkv;
    const int kvh = blockIdx.y;
    const int tid = threadIdx.x;
    const int i = tid / kLanesPerRow, c = tid % kLanesPerRow;
    const int start = *pos;

    const int r = blockIdx.x * kRows + i;  // virtual row: m = r / G, head in group g = r % G
    const int m = r / G, g = r % G;
    const bool row_ok = m < M;
    const int head = kvh * G + g;
    const int limit = start + m;  // last key this row may see

    // Keys needed by the block: up to the causal limit of its last valid row.
    const int last_r = min((int)(blockIdx.x + 1) * kRows, M * G) - 1;
    const int kv_end = start + last_r / G + 1;

    const float qscale = scale * nrt_attn::kLog2e;  // scores in the exp2 domain
    for (int d = c; d < D; d += kLanesPerRow)
        Qs[i][d] = row_ok ? q[((long long)m * Hq + head) * D + d] * qscale : 0.f;

    float row_m = kNegBig, row_l = 0.f;
    float o[kDimsPerLane];
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) o[k] = 0.f;

    for (int tile0 = 0; tile0 < kv_end; tile0 += kTile) {
        __syncthreads();  // the previous tile is consumed (and Qs is written, first time)
        for (int e = tid; e < kTile * kVecPerRow; e += kThreads) {
            const int j = e / kVecPerRow, col = (e % kVecPerRow) * 8;
            const int t = tile0 + j;
            float kf[8], vf[8];
            if (t < kv_end) {
                const long long off = nrt_attn::kv_offset(page_table, t, kvh, Hkv, D) + col;
                nrt_attn::load_bf16x8(k_pool + off, kf);
                nrt_attn::load_bf16x8(v_pool + off, vf);
            } else {
#pragma unroll
                for (int x = 0; x < 8; ++x) kf[x] = vf[x] = 0.f;
            }
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                Ks[j][col + x] = kf[x];
                Vs[j][col + x] = vf[x];
            }
        }
        __syncthreads();

        float s[kColsPerLane];
        float tile_max = kNegBig;
#pragma unroll
        for (int k = 0; k < kColsPerLane; ++k) {
            const int j = c + kLanesPerRow * k;
            float dot = 0.f;
#pragma unroll 16
            for (int d = 0; d < D; ++d) dot += Qs[i][d] * Ks[j][d];
            const bool ok = row_ok && tile0 + j <= limit;
            s[k] = ok ? dot : kNegBig;
            tile_max = ok ? fmaxf(tile_max, dot) : tile_max;
        }
        tile_max = nrt_attn::group_max<kLanesPerRow>(tile_max);
        const float m_new = fmaxf(row_m, tile_max);
        const float alpha = exp2f(row_m - m_new);
        float psum = 0.f;
#pragma unroll
        for (int k = 0; k < kColsPerLane; ++k) {
            const int j = c + kLanesPerRow * k;
            const float p = (row_ok && tile0 + j <= limit) ? exp2f(s[k] - m_new) : 0.f;
            Ps[i][j] = p;
            psum += p;
        }
        row_l = row_l * alpha + nrt_attn::group_sum<kLanesPerRow>(psum);
        row_m = m_new;
        __syncwarp();  // Ps of row i is written and read by the same 8 lanes of one warp

#pragma unroll
        for (int k = 0; k < kDimsPerLane; ++k) o[k] *= alpha;
        const int jmax = min(kTile, kv_end - tile0);
        for (int j = 0; j < jmax; ++j) {
            const float p = Ps[i][j];
#pragma unroll
            for (int k = 0; k < kDimsPerLane; ++k) o[k] += p * Vs[j][c + kLanesPerRow * k];
        }
    }

    if (!row_ok) return;
    const float inv = 1.f / row_l;
    float* dst = out + (long long)m * Hq * D + (long long)head * D;
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) dst[c + kLanesPerRow * k] = o[k] * inv;
}

}  // namespace

// grid (ceil(M * G / 16), Hkv), block 128; G = Hq / Hkv.
#define NRT_PREFILL(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(kThreads) attention_prefill_d##D(                  \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, int M, int Hq, int Hkv, float scale) {              \
        prefill_impl<D>(q, out, k_pool, v_pool, page_table, pos, M, Hq, Hkv, scale);                \
    }

NRT_PREFILL(64)
NRT_PREFILL(128)
