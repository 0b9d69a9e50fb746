// decode_attention.cuh: the body of the split-KV decode attention kernels, shared by
// attention_decode.cu (the one-sequence, rows and host-tier kernels) and attention_scores.cu
// (the rows kernels' scores twins for h2o). Only the kernels' extern "C" entry points live in
// those files, so each module holds exactly its own kernels (the twins in a module of their
// own leave the other kernels' machine code as it was: NVVM's choices for a kernel can shift
// with what else a module holds). See attention_decode.cu for the algorithm.
#pragma once

#include "attn_common.cuh"
#include "decode_attention_mma.cuh"
#include "fault_ring.cuh"

namespace {

using nrt_attn::kNegBig;
using nrt_attn::merge_state;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 128;  // the combine keeps one weight per (split, head) in shared memory
constexpr int kCombineBatch = 16;  // partials (float4) a combining thread loads before it adds any
// A context of at most this many loop steps runs as one split: below it the partials, fence,
// ticket and combine (~2.9 us at d64 on an H200) cost more than the extra steps (~1 us each)
// one block takes alone (NOTES_attention.md, "How many splits at short context").
constexpr int kOneSplitSteps = 3;
// kCluster kernels: a context of at most this many loop steps runs one step per split in the
// first thread-block cluster of its KV head (launched with cluster dims (1, kClusterSize, 1)),
// whose blocks combine through distributed shared memory instead of the workspace and ticket.
constexpr int kClusterSize = 8;
// The mma kernels' split rule (attention_decode_mma.cu; a step is 4 KV blocks, 64 tokens): their
// pages stream in several per warp at once, so a lone split keeps winning over the combine for
// longer (one split up to 6 steps at d64, 4 at d128), and above that a split takes at least 2
// steps (fewer partials to combine: H200, NOTES_attention.md "Decode attention on tensor cores").
template <int D>
__host__ __device__ constexpr int mma_one_split_steps() { return D == 64 ? 6 : 4; }
constexpr int kMmaMinSplitSteps = 2;

// Thread-block clusters (sm_90): the whole cluster's barrier, and a float of another block's
// shared memory (the same variable in block `rank` of this cluster).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ float ld_cluster(const float* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned local = static_cast<unsigned>(__cvta_generic_to_shared(p));
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
#else
    return *p;
#endif
}

template <int D>
struct DecodeShape {
    static constexpr int kRowLanes = D / 8;                // lanes per K/V row (8 dims each)
    static constexpr int kRowGroups = kThreads / kRowLanes;  // rows read at once by a block
};

// GM: compile-time bound on the group size (register arrays). kExact kernels (G == GM: 1,
// 2, 4, 8, the common shapes) let the compiler drop every `g >= G` test; the others take G
// at run time (3 with GM = 4; 5..7 with GM = 8), so 6 instantiations per head dim serve 1..8.
// One output element: fp32 for the one-sequence step, bf16 (a tensor-core GEMM's operand) for rows.
__device__ __forceinline__ void store_out(float* out, long long i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* out, long long i, float v) {
    out[i] = __float2bfloat16_rn(v);
}

// kRows: the batched step, one query row per sequence (blockIdx.z), each with its own slot and
// block-table row from meta int32 [rows, 4] = (position, slot, table row, unused); the
// workspace and tickets are per row. fixed_chunk > 0 fixes the tokens per split (then a row's
// result does not depend on how many splits the launch allows: batch invariance).
// kHost: the table may name host-tier blocks (attn_common.cuh kv_locate), read zero-copy from
// k_host / v_host; the kHost = false kernels ignore those two pointers.
// kScores (rows only; KV pruning by attention mass, h2o): also write each key's raw score (the
// exp2-domain logit q.k * scale * log2(e), before any max is taken) to s_raw fp32
// [rows][Hq][s_stride] at its slot, and each head's final softmax state (max, sum) to s_ml
// float2 [rows][Hq]; attention_scores_rows then turns them into probabilities. The scores fall
// out of the loop that reads K anyway: no second pass over the cache. kScores = false compiles
// every one of these stores away (the other kernels' machine code is unchanged).
// kFault (one-sequence host-tier kernels only): the blocks of KV head 0 also post every host block
// of their split to the fault ring (fault_ring.cuh; ring int32 words, ring_capacity slots), so the
// host drain can move it into HBM for later steps; this step still reads it zero-copy.
// kFault = false compiles the posting away.
// kCluster (one-sequence, device blocks only, sm_90): launched in clusters of kClusterSize blocks
// along the splits; a context of at most kClusterSize steps is split one step per block of the
// first cluster, which combines through distributed shared memory (no workspace, no ticket);
// longer contexts take the workspace path below, as the plain kernel does.
// kMma (no scores, no clusters; attention_decode_mma.cu): the split's tokens are read and
// multiplied by decode_attention_mma.cuh (pages streamed into shared memory, tensor cores) instead
// of the loop below; a step is kWarps pages. The merge and the combine are the same code.
template <int D, int GM, bool kExact, bool kRows, bool kHost, typename OutT, bool kScores = false,
          bool kFault = false, bool kCluster = false, bool kMma = false>
__device__ __forceinline__ void decode_impl(
    const float* __restrict__ q, OutT* __restrict__ out, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ page_table, const int* __restrict__ pos,
    float* __restrict__ ws_acc, float2* __restrict__ ws_ml, int* __restrict__ tickets, int Hkv, int G,
    int max_splits, float scale, int table_stride, int fixed_chunk,
    const __nv_bfloat16* __restrict__ k_host, const __nv_bfloat16* __restrict__ v_host,
    float* s_raw = nullptr, float2* s_ml = nullptr, int s_stride = 0, int* ring = nullptr,
    int ring_capacity = 0) {
    static_assert(kRows || !kScores, "scores are written by the rows kernels only");
    static_assert(!kFault || (kHost && !kRows), "faults are posted by the one-sequence host-tier kernels only");
    static_assert(!kCluster || (!kRows && !kHost), "the cluster kernels are one-sequence, device blocks only");
    static_assert(!kMma || (!kScores && !kCluster), "the mma kernels write no scores and run no clusters");
    if (kExact) G = GM;
    using S = DecodeShape<D>;
    constexpr int kRowLanes = S::kRowLanes, kRowGroups = S::kRowGroups;
    constexpr int kUnroll = GM <= 4 ? 4 : 2;  // tokens per row group per step (registers bound it)
    constexpr int kTokIter = kMma ? kWarps * nrt_attn::kPage : kRowGroups * kUnroll;

    __shared__ __align__(16) float red_acc[kWarps][GM][D];  // also the combine's float4 partials
    __shared__ float red_m[kWarps][GM], red_l[kWarps][GM];
    __shared__ float weight[kMaxSplits][GM];
    __shared__ int is_last;
    // kCluster: this block's merged partial, read by the cluster's first block.
    __shared__ float cl_acc[kCluster ? GM : 1][kCluster ? D : 1];
    __shared__ float cl_m[kCluster ? GM : 1], cl_l[kCluster ? GM : 1];

    // Before pdl_wait we may read what kernels before our predecessor wrote (pdl.cuh): the
    // position, the page table and every cached row but the newest. Only q and the newest
    // K/V row come from the kernel right before us (rope_append).
    const int kvh = blockIdx.x, split = blockIdx.y;
    int seq_len;
    if (kRows) {
        const long long row = blockIdx.z;
        const int* meta = pos + 4 * row;
        seq_len = meta[1] + 1;
        page_table += (long long)meta[2] * table_stride;
        q += row * Hkv * G * D;
        out += row * Hkv * G * D;
        ws_acc += row * Hkv * max_splits * G * D;
        ws_ml += row * Hkv * max_splits * G;
        tickets += row * Hkv;
        if constexpr (kScores) {
            s_raw += row * Hkv * G * s_stride;
            s_ml += row * Hkv * G;
        }
    } else {
        seq_len = *pos + 1;
    }
    // in_cluster (kCluster, uniform over the launch): one step per split, the first cluster only.
    const bool in_cluster = kCluster && seq_len <= kClusterSize * kTokIter;
    int chunk = kTokIter;
    if (!in_cluster) {
        const int one_split = kMma ? mma_one_split_steps<D>() : kOneSplitSteps;
        chunk = seq_len <= one_split * kTokIter ? seq_len : (seq_len + max_splits - 1) / max_splits;
        chunk = (chunk + kTokIter - 1) / kTokIter * kTokIter;
        if (kMma && chunk < kMmaMinSplitSteps * kTokIter) chunk = kMmaMinSplitSteps * kTokIter;
        if (fixed_chunk > chunk) chunk = fixed_chunk;  // never fewer tokens than fit max_splits
    }
    const int nsplit = (seq_len + chunk - 1) / chunk;
    // With a cluster combine every block of the first cluster takes part (an empty split holds
    // the empty state), so the cluster barriers see all of them.
    if (in_cluster ? (split >= kClusterSize || (nsplit == 1 && split > 0)) : split >= nsplit) return;
    const int start = in_cluster ? min(split * chunk, seq_len) : split * chunk;  // empty cluster splits: none
    const int end = min(start + chunk, seq_len);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rg = tid / kRowLanes;         // row group
    const int dim0 = (tid % kRowLanes) * 8;  // this lane's 8 dims
    const int newest = seq_len - 1;          // rope_append writes this row just before us

    // kFault: every KV head reads the same table entries, so head 0's blocks post the split's host
    // pages for all of them (the table is written by no kernel: PDL-safe, before the wait). Then
    // the warp is reconverged explicitly: after the posts' divergent CAS loops the compiler could
    // not prove the warps converged at the main loop's reductions and put divergence checks with
    // collective fallbacks before their shuffles (the host twin has none there). The H200 timed
    // the CUDA-core twin 4x slower than the host twin on device-resident blocks; with the sync the
    // SASS has the host twin's shape (NOTES_host_tier.md).
    auto post_faults = [&] {
        if constexpr (kFault) {
            if (kvh == 0)
                nrt_fault::post_host_pages(page_table, start / nrt_attn::kPage, (end - 1) / nrt_attn::kPage, ring,
                                           ring_capacity, tid, kThreads);
            __syncwarp();
        }
    };
    if constexpr (kMma) {
        post_faults();
        nrt_decode_mma::split_state<D, GM, kWarps, kHost>(q, k_pool, v_pool, page_table, kvh, Hkv, G, start, end,
                                                           newest, scale * nrt_attn::kLog2e, red_acc, red_m, red_l,
                                                           k_host, v_host);
    } else {
        // Two register buffers of one step's K and V rows (A, B): the loop issues the next step's
        // loads into one before it computes on the other, so a block keeps two steps of rows in
        // flight instead of waiting out the memory latency once per step.
        using Rows = uint4[kUnroll];
        using Valid = bool[kUnroll];
        Rows k_a, v_a, k_b, v_b;
        Valid ok_a, ok_b;
        auto load_row = [&](Rows& kraw, Rows& vraw, int u, int t) {
            const __nv_bfloat16 *kb = k_pool, *vb = v_pool;
            const long long off = nrt_attn::kv_locate<kHost>(page_table, t, kvh, Hkv, D, kb, vb, k_host, v_host) + dim0;
            kraw[u] = *reinterpret_cast<const uint4*>(kb + off);
            vraw[u] = *reinterpret_cast<const uint4*>(vb + off);
        };
        // Issue every K and V load of a step before using any (memory-level parallelism).
        auto load_step = [&](Rows& kraw, Rows& vraw, Valid& valid, int base, bool older_only) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int t = base + u * kRowGroups + rg;
                valid[u] = t < end;
                if (!valid[u]) {
                    kraw[u] = make_uint4(0, 0, 0, 0);
                    vraw[u] = make_uint4(0, 0, 0, 0);
                } else if (!older_only || t != newest) {
                    load_row(kraw, vraw, u, t);
                }
            }
        };
        // The first step's older rows stream in while rope_append still runs; then wait for it.
        load_step(k_a, v_a, ok_a, start, true);
        post_faults();  // while the first loads are in flight
        nrt::pdl_enter();
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (start + u * kRowGroups + rg == newest && ok_a[u]) load_row(k_a, v_a, u, newest);

        // q of the G heads, prescaled so that scores are in the exp2 domain.
        float qr[GM][8];
        const float qscale = scale * nrt_attn::kLog2e;
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g >= G) {  // a head past the group: zeros, never used
#pragma unroll
                for (int i = 0; i < 8; ++i) qr[g][i] = 0.f;
                continue;
            }
            const float4* src = reinterpret_cast<const float4*>(q + (long long)(kvh * G + g) * D + dim0);
            const float4 a = src[0], b = src[1];
            nrt_attn::scaled_q(a, b, qscale, qr[g]);
        }

        float m[GM], l[GM], acc[GM][8];
        nrt_attn::empty_state<GM>(m, l, acc);

        auto compute_step = [&](const Rows& kraw, const Rows& vraw, const Valid& valid, int base) {
            float s[kUnroll][GM];
            nrt_attn::row_scores<GM, kUnroll, kRowLanes>(kraw, qr, s, G);
            if constexpr (kScores) {
                if (dim0 == 0) {  // every lane of a row group holds the group's sums; one writes them
#pragma unroll
                    for (int u = 0; u < kUnroll; ++u) {
                        if (!valid[u]) continue;
                        const int t = base + u * kRowGroups + rg;
#pragma unroll
                        for (int g = 0; g < GM; ++g) {
                            if (g >= G) break;
                            s_raw[(long long)(kvh * G + g) * s_stride + t] = s[u][g];
                        }
                    }
                }
            }
            nrt_attn::online_softmax_step<GM, kUnroll>(s, valid, vraw, m, l, acc, G);
        };
        // Steps alternate between the buffers (two per trip, so each buffer stays in registers).
        for (int base = start; base < end; base += 2 * kTokIter) {
            const int next = base + kTokIter;
            if (next < end) load_step(k_b, v_b, ok_b, next, false);
            compute_step(k_a, v_a, ok_a, base);
            if (next >= end) break;
            if (next + kTokIter < end) load_step(k_a, v_a, ok_a, next + kTokIter, false);
            compute_step(k_b, v_b, ok_b, next);
        }

        // Merge the row groups of each warp (lanes kRowLanes, 2*kRowLanes, ... apart) ...
#pragma unroll
        for (int off = kRowLanes; off < 32; off *= 2) merge_state<GM>(m, l, acc, off, G);
        // ... then the warps, through shared memory.
        if (lane < kRowLanes) {
#pragma unroll
            for (int g = 0; g < GM; ++g) {
#pragma unroll
                for (int i = 0; i < 8; ++i) red_acc[warp][g][dim0 + i] = acc[g][i];
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                red_m[warp][g] = m[g];
                red_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    for (int idx = tid; idx < G * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        float mx = kNegBig;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w][g]);
        float sum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float c = exp2f(red_m[w][g] - mx);
            sum += red_l[w][g] * c;
            a += red_acc[w][g][d] * c;
        }
        if (nsplit == 1) {
            store_out(out, (long long)(kvh * G + g) * D + d, a / sum);
            if constexpr (kScores) {
                if (d == 0) s_ml[kvh * G + g] = make_float2(mx, sum);
            }
        } else if (kCluster && in_cluster) {
            cl_acc[kCluster ? g : 0][kCluster ? d : 0] = a;
            if (d == 0) {
                cl_m[kCluster ? g : 0] = mx;
                cl_l[kCluster ? g : 0] = sum;
            }
        } else {
            const long long slot = ((long long)kvh * max_splits + split) * G + g;
            ws_acc[slot * D + d] = a;
            if (d == 0) ws_ml[slot] = make_float2(mx, sum);
        }
    }
    if (nsplit == 1) return;

    if constexpr (kCluster) {
        if (in_cluster) {  // block `split` is rank `split` of its cluster (cluster dims (1, 8, 1))
            cluster_sync();  // every block's partial is in its shared memory
            if (split == 0) {
                for (int idx = tid; idx < G * D; idx += kThreads) {
                    const int g = idx / D, d = idx % D;
                    float pm[kClusterSize], pl[kClusterSize], pa[kClusterSize];
#pragma unroll
                    for (int r = 0; r < kClusterSize; ++r) {  // every remote load before any use
                        const bool live = r < nsplit;
                        pm[r] = live ? ld_cluster(&cl_m[g], r) : kNegBig;
                        pl[r] = live ? ld_cluster(&cl_l[g], r) : 0.f;
                        pa[r] = live ? ld_cluster(&cl_acc[g][d], r) : 0.f;
                    }
                    float mx = kNegBig;
#pragma unroll
                    for (int r = 0; r < kClusterSize; ++r) mx = fmaxf(mx, pm[r]);
                    float sum = 0.f, a = 0.f;
#pragma unroll
                    for (int r = 0; r < kClusterSize; ++r) {
                        const float c = exp2f(pm[r] - mx);
                        sum += pl[r] * c;
                        a += pa[r] * c;
                    }
                    store_out(out, (long long)(kvh * G + g) * D + d, a / sum);
                }
            }
            cluster_sync();  // the other blocks keep their shared memory until block 0 has read it
            return;
        }
    }

    // Last block of this KV head to finish combines every split.
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&tickets[kvh], 1) == nsplit - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    // Every partial is loaded before any is used (one L2 round trip for the (max, sum) pairs, one
    // per kCombineBatch splits for the outputs): a loop that waits for each load in turn made the
    // combine a chain of ~nsplit / 4 round trips per output element (NOTES_attention.md, "The
    // combine, batched").
    for (int g = warp; g < G; g += kWarps) {
        const long long row = (long long)kvh * max_splits * G + g;
        constexpr int kPerLane = kMaxSplits / 32;
        float2 ml[kPerLane];
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int sp = lane + 32 * j;
            ml[j] = sp < nsplit ? __ldcg(&ws_ml[row + (long long)sp * G]) : make_float2(kNegBig, 0.f);
        }
        float mx = kNegBig;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) mx = fmaxf(mx, ml[j].x);
        mx = nrt_attn::group_max<32>(mx);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int sp = lane + 32 * j;
            const float c = exp2f(ml[j].x - mx);
            if (sp < nsplit) weight[sp][g] = c;
            sum += ml[j].y * c;  // a padded slot adds 0
        }
        sum = nrt_attn::group_sum<32>(sum);
        if constexpr (kScores) {
            if (lane == 0) s_ml[kvh * G + g] = make_float2(mx, sum);
        }
        __syncwarp();
        for (int sp = lane; sp < nsplit; sp += 32) weight[sp][g] /= sum;
    }
    __syncthreads();
    // Thread t sums float4 column t % cols of the G heads' outputs over the splits of group
    // t / cols (contiguous ranges, in order); the groups' sums are added in group order through
    // shared memory. Deterministic: the order depends on nsplit and the shape only.
    const int cols = G * D / 4;
    const int groups = max(1, min(kWarps, kThreads / cols));
    const int per = (nsplit + groups - 1) / groups;
    const float4* acc4 = reinterpret_cast<const float4*>(ws_acc + (long long)kvh * max_splits * G * D);
    float4* part = reinterpret_cast<float4*>(&red_acc[0][0][0]);  // [groups][cols]; holds kWarps * GM * D floats
    for (int t = tid; t < cols * groups; t += kThreads) {
        const int col = t % cols, grp = t / cols, g = col * 4 / D;
        const int sp_end = min(nsplit, (grp + 1) * per);
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int sp = grp * per; sp < sp_end; sp += kCombineBatch) {
            // Unpredicated loads (past the range: its last split again, with weight 0), so all
            // kCombineBatch are in flight at once; predicated ones were issued a few at a time.
            float4 v[kCombineBatch];
#pragma unroll
            for (int u = 0; u < kCombineBatch; ++u) v[u] = __ldcg(acc4 + (long long)min(sp + u, sp_end - 1) * cols + col);
#pragma unroll
            for (int u = 0; u < kCombineBatch; ++u) {
                const float w = sp + u < sp_end ? weight[min(sp + u, sp_end - 1)][g] : 0.f;
                a.x += w * v[u].x; a.y += w * v[u].y; a.z += w * v[u].z; a.w += w * v[u].w;
            }
        }
        if (groups == 1) {
            const long long o = (long long)kvh * G * D + col * 4;
            store_out(out, o, a.x); store_out(out, o + 1, a.y); store_out(out, o + 2, a.z); store_out(out, o + 3, a.w);
        } else {
            part[t] = a;
        }
    }
    if (groups > 1) {
        __syncthreads();
        const float* pf = &red_acc[0][0][0];
        for (int idx = tid; idx < G * D; idx += kThreads) {
            float a = pf[idx];
            for (int grp = 1; grp < groups; ++grp) a += pf[grp * G * D + idx];
            store_out(out, (long long)kvh * G * D + idx, a);
        }
    }
    if (tid == 0) tickets[kvh] = 0;  // ready for the next launch (the graph replays it)
}

}  // namespace

// One instantiation of MACRO(D, GM, kExact, NAME) per group-size kernel of head dim D.
#define NRT_DECODE_ALL_G(D, MACRO, PREFIX)                                                          \
    MACRO(D, 1, true, PREFIX##_d##D##_g1)                                                           \
    MACRO(D, 2, true, PREFIX##_d##D##_g2)                                                           \
    MACRO(D, 4, true, PREFIX##_d##D##_g4)                                                           \
    MACRO(D, 8, true, PREFIX##_d##D##_g8)                                                           \
    MACRO(D, 4, false, PREFIX##_d##D##_gmax4)                                                       \
    MACRO(D, 8, false, PREFIX##_d##D##_gmax8)

// The entry points, shared by the modules that instantiate decode_impl (attention_decode.cu: the
// CUDA-core kernels, KIND CORE; attention_decode_mma.cu: MMA; attention_decode_cluster.cu: CLUSTER).
// One-sequence: q fp32 [Hq*D] -> out fp32 [Hq*D], position *pos. Rows: q fp32 [rows][Hq*D] -> out
// bf16 [rows][Hq*D], meta int32 [rows][4], tables [*][table_stride]. Host-tier: the one-sequence
// arguments plus k_host, v_host; the fault twins also ring, ring_capacity.
#define NRT_DECODE_SEQ_KERNEL(D, GM, EXACT, NAME, CLUSTER, MMA)                                     \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, float* ws_acc, float2* ws_ml, int* tickets, int Hkv, \
        int G, int max_splits, float scale) {                                                       \
        decode_impl<D, GM, EXACT, false, false, float, false, false, CLUSTER, MMA>(                 \
            q, out, k_pool, v_pool, page_table, pos, ws_acc, ws_ml, tickets, Hkv, G, max_splits,    \
            scale, 0, 0, nullptr, nullptr);                                                         \
    }

#define NRT_DECODE_ROWS_KERNEL(D, GM, EXACT, NAME, MMA)                                             \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, __nv_bfloat16* out, const __nv_bfloat16* k_pool,                            \
        const __nv_bfloat16* v_pool, const int* tables, const int* meta, float* ws_acc,             \
        float2* ws_ml, int* tickets, int Hkv, int G, int max_splits, float scale,                   \
        int table_stride, int fixed_chunk) {                                                        \
        decode_impl<D, GM, EXACT, true, false, __nv_bfloat16, false, false, false, MMA>(            \
            q, out, k_pool, v_pool, tables, meta, ws_acc, ws_ml, tickets, Hkv, G, max_splits,       \
            scale, table_stride, fixed_chunk, nullptr, nullptr);                                    \
    }

#define NRT_DECODE_HOST_KERNEL(D, GM, EXACT, NAME, MMA)                                             \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, float* ws_acc, float2* ws_ml, int* tickets, int Hkv, \
        int G, int max_splits, float scale, const __nv_bfloat16* k_host,                            \
        const __nv_bfloat16* v_host) {                                                              \
        decode_impl<D, GM, EXACT, false, true, float, false, false, false, MMA>(                    \
            q, out, k_pool, v_pool, page_table, pos, ws_acc, ws_ml, tickets, Hkv, G, max_splits,    \
            scale, 0, 0, k_host, v_host);                                                           \
    }

#define NRT_DECODE_HOST_FAULT_KERNEL(D, GM, EXACT, NAME, MMA)                                       \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, float* ws_acc, float2* ws_ml, int* tickets, int Hkv, \
        int G, int max_splits, float scale, const __nv_bfloat16* k_host,                            \
        const __nv_bfloat16* v_host, int* ring, int ring_capacity) {                                \
        decode_impl<D, GM, EXACT, false, true, float, false, true, false, MMA>(                     \
            q, out, k_pool, v_pool, page_table, pos, ws_acc, ws_ml, tickets, Hkv, G, max_splits,    \
            scale, 0, 0, k_host, v_host, nullptr, nullptr, 0, ring, ring_capacity);                 \
    }

// The same entry points with KIND fixed (the MACRO argument of NRT_DECODE_ALL_G takes four).
#define NRT_DECODE_SEQ_CORE(D, GM, EXACT, NAME) NRT_DECODE_SEQ_KERNEL(D, GM, EXACT, NAME, false, false)
#define NRT_DECODE_SEQ_MMA(D, GM, EXACT, NAME) NRT_DECODE_SEQ_KERNEL(D, GM, EXACT, NAME, false, true)
#define NRT_DECODE_SEQ_CLUSTER(D, GM, EXACT, NAME) NRT_DECODE_SEQ_KERNEL(D, GM, EXACT, NAME, true, false)
#define NRT_DECODE_ROWS_CORE(D, GM, EXACT, NAME) NRT_DECODE_ROWS_KERNEL(D, GM, EXACT, NAME, false)
#define NRT_DECODE_ROWS_MMA(D, GM, EXACT, NAME) NRT_DECODE_ROWS_KERNEL(D, GM, EXACT, NAME, true)
#define NRT_DECODE_HOST_CORE(D, GM, EXACT, NAME) NRT_DECODE_HOST_KERNEL(D, GM, EXACT, NAME, false)
#define NRT_DECODE_HOST_MMA(D, GM, EXACT, NAME) NRT_DECODE_HOST_KERNEL(D, GM, EXACT, NAME, true)
#define NRT_DECODE_HOST_FAULT_CORE(D, GM, EXACT, NAME) NRT_DECODE_HOST_FAULT_KERNEL(D, GM, EXACT, NAME, false)
#define NRT_DECODE_HOST_FAULT_MMA(D, GM, EXACT, NAME) NRT_DECODE_HOST_FAULT_KERNEL(D, GM, EXACT, NAME, true)

// A module's families, every group-size kernel of both head dims each: PREFIX_d*_g* (one
// sequence), PREFIX_rows_d*_g*, PREFIX_host_d*_g* and PREFIX_host_fault_d*_g*.
#define NRT_DECODE_SEQ_TWINS(PREFIX, KIND)                                                          \
    NRT_DECODE_ALL_G(64, NRT_DECODE_SEQ_##KIND, PREFIX)                                             \
    NRT_DECODE_ALL_G(128, NRT_DECODE_SEQ_##KIND, PREFIX)
#define NRT_DECODE_ROWS_TWINS(PREFIX, KIND)                                                         \
    NRT_DECODE_ALL_G(64, NRT_DECODE_ROWS_##KIND, PREFIX##_rows)                                     \
    NRT_DECODE_ALL_G(128, NRT_DECODE_ROWS_##KIND, PREFIX##_rows)
#define NRT_DECODE_HOST_TWINS(PREFIX, KIND)                                                         \
    NRT_DECODE_ALL_G(64, NRT_DECODE_HOST_##KIND, PREFIX##_host)                                     \
    NRT_DECODE_ALL_G(128, NRT_DECODE_HOST_##KIND, PREFIX##_host)                                    \
    NRT_DECODE_ALL_G(64, NRT_DECODE_HOST_FAULT_##KIND, PREFIX##_host_fault)                         \
    NRT_DECODE_ALL_G(128, NRT_DECODE_HOST_FAULT_##KIND, PREFIX##_host_fault)
