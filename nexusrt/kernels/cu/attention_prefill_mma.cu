// attention_prefill_mma: causal GQA prefill attention on tensor cores (mma.sync m16n8k16
// bf16, fp32 accumulate), FlashAttention-2 style. Same contract as attention_prefill.cu —
// M query rows at positions start .. start+M-1 (start = *pos, read on the device) against
// keys 0 .. start+M-1 in the paged bf16 cache, which rope_append has already filled for
// this chunk — but it writes bf16 rows, the operand the O-projection GEMM reads.
// q fp32 [M, Hq, D] -> out bf16 [M, Hq * D].
//
// A block owns 16 or 32 query rows per warp (R = 1 or 2 m16 tiles: each K/V fragment read from
// shared memory then feeds R mmas) of ONE query head, 4 or 8 warps. Blocks of the heads of
// one GQA group are adjacent in the grid (blockIdx.x = head), so they read the same K/V
// tiles close together in time and L2 serves all but the first. Key tiles of 64 rows are
// gathered through the page table with cp.async (16 bytes each, zero-filled past the last
// key) into a double buffer, so the next tile is in flight while this one is computed.
// Q lives in registers for the whole block; S = Q K^T stays in registers, is turned into
// the bf16 A operand of P V in place (the m16n8k16 accumulator layout of two adjacent n8
// tiles is exactly the A layout of one k16 slice), and the online softmax runs in the exp2
// domain on fp32 values. Shared tiles are XOR-swizzled in 16-byte chunks so ldmatrix reads
// 8 rows of one column chunk from 8 different bank groups.
#include "attn_common.cuh"
#include "mma_common.cuh"

namespace {

using nrt_attn::kNegBig;
using nrt_mma::cp_async16;
using nrt_mma::cp_async_commit;
using nrt_mma::cp_async_wait;
using nrt_mma::ldmatrix_x4;
using nrt_mma::ldmatrix_x4_trans;
using nrt_mma::mma_bf16;
using nrt_mma::pack_bf16;
using nrt_mma::smem_addr;
using nrt_mma::swz;

constexpr int kBlockN = 64;  // keys per tile

// Gather keys key0 .. key0+63 of KV head `kvh` (K and V) into the swizzled tiles; rows at or
// past kv_end are zero-filled, so a masked probability (0) never multiplies garbage.
// kHost: the table may name host-tier blocks, fetched zero-copy from k_host / v_host
// (attn_common.cuh kv_locate); cp.async reads them over the bus like any global address.
template <int D, int kThreads, bool kHost>
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* Ks, __nv_bfloat16* Vs,
                                             const __nv_bfloat16* __restrict__ k_pool,
                                             const __nv_bfloat16* __restrict__ v_pool,
                                             const int* __restrict__ page_table, int key0, int kv_end,
                                             int kvh, int Hkv, const __nv_bfloat16* k_host,
                                             const __nv_bfloat16* v_host) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int e = threadIdx.x; e < kBlockN * kChunks; e += kThreads) {
        const int j = e / kChunks, col = (e % kChunks) * 8;
        const int t = key0 + j;
        const bool ok = t < kv_end;
        const __nv_bfloat16 *kb = k_pool, *vb = v_pool;
        const long long off =
            ok ? nrt_attn::kv_locate<kHost>(page_table, t, kvh, Hkv, D, kb, vb, k_host, v_host) + col : 0;
        cp_async16(smem_addr(Ks + swz<D>(j, col)), kb + off, ok);
        cp_async16(smem_addr(Vs + swz<D>(j, col)), vb + off, ok);
    }
}

template <int D, int kWarps, int R, bool kQInSmem, bool kHost>
__device__ __forceinline__ void prefill_mma(const float* __restrict__ q, __nv_bfloat16* __restrict__ out,
                                            const __nv_bfloat16* __restrict__ k_pool,
                                            const __nv_bfloat16* __restrict__ v_pool,
                                            const int* __restrict__ page_table, const int* __restrict__ pos,
                                            int M, int Hq, int Hkv, float scale_log2,
                                            const __nv_bfloat16* __restrict__ k_host,
                                            const __nv_bfloat16* __restrict__ v_host) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    constexpr int kThreads = kWarps * 32;
    constexpr int kWarpRows = 16 * R;           // a warp owns R m16 tiles: each K/V fragment feeds R mmas
    constexpr int kBlockM = kWarps * kWarpRows;  // query rows per block
    constexpr int kK = D / 16;  // k16 slices of Q K^T
    constexpr int kN = D / 8;   // n8 tiles of the output
    constexpr int kS = kBlockN / 8;  // n8 tiles of a score row
    // Two buffers, each a K tile then a V tile. Q is staged in buffer 1 (it fits: kBlockM <= 2 *
    // kBlockN) and moved to registers before tile 1 is fetched there, so a block needs 64 KiB at
    // D = 128 and three blocks fit an SM. With kQInSmem, Q stays in a third region and its
    // fragments are re-read per k16 slice instead: registers for R = 2 at D = 128.
    static_assert(kBlockM <= 2 * kBlockN, "Q must fit in one K+V buffer");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    constexpr int kTile = kBlockN * D;  // elements of one K or V tile
    __nv_bfloat16* Qs = smem + (kQInSmem ? 4 : 2) * kTile;

    const int head = blockIdx.x;
    const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;  // longest (latest) rows first
    const int kvh = head / (Hq / Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int start = *pos;
    const int kv_end = start + min(M, m0 + kBlockM);  // keys the block's last valid row sees
    const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

    load_kv_tile<D, kThreads, kHost>(smem, smem + kTile, k_pool, v_pool, page_table, 0, kv_end, kvh, Hkv,
                                     k_host, v_host);
    cp_async_commit();

    // Q rows (fp32, from rope_append) -> bf16 tile; rows past M are zeros (never stored).
    for (int e = threadIdx.x; e < kBlockM * (D / 8); e += kThreads) {
        const int r = e / (D / 8), col = (e % (D / 8)) * 8;
        const int m = m0 + r;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
        if (m < M) {
            const float4* src = reinterpret_cast<const float4*>(q + ((long long)m * Hq + head) * D + col);
            a = src[0];
            b = src[1];
        }
        uint4 packed;
        packed.x = pack_bf16(a.x, a.y);
        packed.y = pack_bf16(a.z, a.w);
        packed.z = pack_bf16(b.x, b.y);
        packed.w = pack_bf16(b.z, b.w);
        *reinterpret_cast<uint4*>(Qs + swz<D>(r, col)) = packed;
    }
    __syncthreads();
    constexpr int kQRegs = kQInSmem ? 1 : kK;  // k16 slices of Q held in registers at once
    uint32_t qf[R][kQRegs][4];
    if constexpr (!kQInSmem) {
#pragma unroll
        for (int mi = 0; mi < R; ++mi)
#pragma unroll
            for (int kk = 0; kk < kK; ++kk)
                ldmatrix_x4(qf[mi][kk], smem_addr(Qs + swz<D>(warp * kWarpRows + mi * 16 + (lane & 15),
                                                              kk * 16 + (lane >> 4) * 8)));
        __syncthreads();  // every warp holds its Q rows before buffer 1 is refilled with keys
    }

    float o[R][kN][4];
    float row_max[R][2], row_sum[R][2];
#pragma unroll
    for (int mi = 0; mi < R; ++mi) {
#pragma unroll
        for (int n = 0; n < kN; ++n) o[mi][n][0] = o[mi][n][1] = o[mi][n][2] = o[mi][n][3] = 0.f;
        row_max[mi][0] = row_max[mi][1] = kNegBig;
        row_sum[mi][0] = row_sum[mi][1] = 0.f;
    }
    // This thread's rows (lane/4 and lane/4 + 8 of each of the warp's m16 tiles) as cache positions.
    const int warp_first = start + m0 + warp * kWarpRows;
    const int qpos0 = warp_first + (lane >> 2);

    for (int t = 0; t < n_tiles; ++t) {
        if (t + 1 < n_tiles) {
            __nv_bfloat16* next = smem + ((t + 1) & 1) * 2 * kTile;
            load_kv_tile<D, kThreads, kHost>(next, next + kTile, k_pool, v_pool, page_table, (t + 1) * kBlockN,
                                             kv_end, kvh, Hkv, k_host, v_host);
        }
        cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile t
        cp_async_wait<1>();
        __syncthreads();
        const __nv_bfloat16* Kt = smem + (t & 1) * 2 * kTile;
        const __nv_bfloat16* Vt = Kt + kTile;
        const int key0 = t * kBlockN;

        float s[R][kS][4];
#pragma unroll
        for (int mi = 0; mi < R; ++mi)
#pragma unroll
            for (int n = 0; n < kS; ++n) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kK; ++kk) {
            const int qk = kQInSmem ? 0 : kk;
            if constexpr (kQInSmem) {
#pragma unroll
                for (int mi = 0; mi < R; ++mi)
                    ldmatrix_x4(qf[mi][0], smem_addr(Qs + swz<D>(warp * kWarpRows + mi * 16 + (lane & 15),
                                                                 kk * 16 + (lane >> 4) * 8)));
            }
#pragma unroll
            for (int nn = 0; nn < kBlockN / 16; ++nn) {
                uint32_t b[4];
                ldmatrix_x4(b, smem_addr(Kt + swz<D>(nn * 16 + (lane & 7) + (lane >> 4) * 8,
                                                     kk * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
                for (int mi = 0; mi < R; ++mi) {
                    mma_bf16(s[mi][2 * nn], qf[mi][qk], b[0], b[1]);
                    mma_bf16(s[mi][2 * nn + 1], qf[mi][qk], b[2], b[3]);
                }
            }
        }
        // Causal mask, only on tiles that reach past the warp's first row.
        if (key0 + kBlockN - 1 > warp_first) {
#pragma unroll
            for (int mi = 0; mi < R; ++mi)
#pragma unroll
                for (int n = 0; n < kS; ++n) {
                    const int key = key0 + n * 8 + (lane & 3) * 2;
                    const int row = qpos0 + mi * 16;
                    if (key > row) s[mi][n][0] = kNegBig;
                    if (key + 1 > row) s[mi][n][1] = kNegBig;
                    if (key > row + 8) s[mi][n][2] = kNegBig;
                    if (key + 1 > row + 8) s[mi][n][3] = kNegBig;
                }
        }
        // Online softmax: the 4 lanes of a quad hold one row; scores scaled into the exp2 domain.
#pragma unroll
        for (int mi = 0; mi < R; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = kNegBig;
#pragma unroll
                for (int n = 0; n < kS; ++n) mx = fmaxf(mx, fmaxf(s[mi][n][2 * h], s[mi][n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[mi][h], mx * scale_log2);
                const float alpha = exp2f(row_max[mi][h] - m_new);
                row_max[mi][h] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < kS; ++n) {
                    s[mi][n][2 * h] = exp2f(fmaf(s[mi][n][2 * h], scale_log2, -m_new));
                    s[mi][n][2 * h + 1] = exp2f(fmaf(s[mi][n][2 * h + 1], scale_log2, -m_new));
                    sum += s[mi][n][2 * h] + s[mi][n][2 * h + 1];
                }
                row_sum[mi][h] = row_sum[mi][h] * alpha + sum;  // this lane's share; the quad is summed at the end
#pragma unroll
                for (int n = 0; n < kN; ++n) {
                    o[mi][n][2 * h] *= alpha;
                    o[mi][n][2 * h + 1] *= alpha;
                }
            }
        // O += P V, P straight from the S registers.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t pa[R][4];
#pragma unroll
            for (int mi = 0; mi < R; ++mi) {
                pa[mi][0] = pack_bf16(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                pa[mi][1] = pack_bf16(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                pa[mi][2] = pack_bf16(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                pa[mi][3] = pack_bf16(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; ++dd) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, smem_addr(Vt + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                           dd * 16 + (lane >> 4) * 8)));
#pragma unroll
                for (int mi = 0; mi < R; ++mi) {
                    mma_bf16(o[mi][2 * dd], pa[mi], b[0], b[1]);
                    mma_bf16(o[mi][2 * dd + 1], pa[mi], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

#pragma unroll
    for (int mi = 0; mi < R; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_sum[mi][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int m = m0 + warp * kWarpRows + mi * 16 + (lane >> 2) + 8 * h;
            if (m >= M) continue;
            const float inv = 1.f / l;
            __nv_bfloat16* dst = out + ((long long)m * Hq + head) * D + (lane & 3) * 2;
#pragma unroll
            for (int n = 0; n < kN; ++n)
                *reinterpret_cast<uint32_t*>(dst + n * 8) =
                    pack_bf16(o[mi][n][2 * h] * inv, o[mi][n][2 * h + 1] * inv);
        }
}

}  // namespace

// grid (Hq, ceil(M / (16 * W * R))), block 32 * W, dynamic shared memory 4 * 64 * D * 2 bytes
// (plus 16 * W * R * D * 2 with Q kept in shared memory, the _qs kernels).
// W warps of R m16 tiles each; MINB: blocks per SM the register budget is capped for.
// Each shape has a host-tier twin, NAME_host, taking k_host, v_host at the end.
#define NRT_PREFILL_MMA_KIND(D, W, R, MINB, QS, NAME)                                               \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB) NAME(                                \
        const float* q, __nv_bfloat16* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, \
        const int* page_table, const int* pos, int M, int Hq, int Hkv, float scale_log2) {          \
        prefill_mma<D, W, R, QS, false>(q, out, k_pool, v_pool, page_table, pos, M, Hq, Hkv,        \
                                        scale_log2, nullptr, nullptr);                              \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB) NAME##_host(                         \
        const float* q, __nv_bfloat16* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, \
        const int* page_table, const int* pos, int M, int Hq, int Hkv, float scale_log2,            \
        const __nv_bfloat16* k_host, const __nv_bfloat16* v_host) {                                 \
        prefill_mma<D, W, R, QS, true>(q, out, k_pool, v_pool, page_table, pos, M, Hq, Hkv,         \
                                       scale_log2, k_host, v_host);                                 \
    }
#define NRT_PREFILL_MMA(D, W, R, MINB) \
    NRT_PREFILL_MMA_KIND(D, W, R, MINB, false, attention_prefill_mma_d##D##_w##W##_r##R)
#define NRT_PREFILL_MMA_QS(D, W, R, MINB) \
    NRT_PREFILL_MMA_KIND(D, W, R, MINB, true, attention_prefill_mma_d##D##_w##W##_r##R##_qs)

// Register caps: defaults from scripts/sweep_attention.py on an H200 (kernels/NOTES_attention.md);
// a sweep overrides them with -D.
#ifndef NRT_MINB_D64_W4
#define NRT_MINB_D64_W4 1
#endif
#ifndef NRT_MINB_D128_W4
#define NRT_MINB_D128_W4 3
#endif
NRT_PREFILL_MMA(64, 4, 1, NRT_MINB_D64_W4)
NRT_PREFILL_MMA(64, 8, 1, 1)
NRT_PREFILL_MMA(64, 4, 2, 1)
NRT_PREFILL_MMA(128, 4, 1, NRT_MINB_D128_W4)
NRT_PREFILL_MMA(128, 8, 1, 1)
NRT_PREFILL_MMA_QS(128, 4, 2, 2)
NRT_PREFILL_MMA_QS(64, 4, 2, 2)
