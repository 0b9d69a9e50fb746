// The persistent decode kernel (issue 15; design: nexusrt/kernels/NOTES_persistent.md): a
// whole decode step in one launch. This header is the kernel; its entry points are in two modules
// of their own, persistent_decode.cu (256 threads) and persistent_decode_loader.cu (the
// warp-specialised ones, sm_90; opt-in and slower on the H200, so the default paths never compile
// them), each including it first. Grid = number of SMs, one CTA per SM (launched
// cooperatively, so every CTA is resident: the no-deadlock argument needs it). CTA s walks
// rows offsets[s] .. offsets[s+1]-1 of the program table that
// nexusrt/backends/cuda/megakernel/lower.py builds (16 int32 per instruction:
// op, layer, start, end, arg, signal, nwaits, (counter, target) x 4, pad).
//
// Per instruction: thread 0 spins until every wait is met (ld.acquire.gpu, __nanosleep
// backoff), the CTA syncs, runs the tile, syncs again (all its stores issued), and thread 0
// makes them visible and adds 1 to the signal counter with red.release.gpu.
//
// Counters are never reset between steps. Counter c receives exactly totals[c] signals per
// step, so after `epoch` complete steps it holds epoch * totals[c] (mod 2^32). A wait
// (c, t) is met when (int)(counter - epoch * totals[c]) >= t: unsigned wrap-around keeps
// this exact forever (the difference stays in [0, totals[c]] during a step). The epoch word
// is read by every CTA at its start; the last CTA to finish (an exit ticket) advances it and
// rezeroes the ticket. Launches on one stream do not overlap, so the next launch sees it.
// The host zeroes counters, epoch and ticket once when it uploads a program (and after a
// fault); nexusrt/backends/cuda/megakernel/counters.py is the same rule in Python, tested.
//
// Everything the kernel needs is one array of 64-bit slots (enum Slot below; the launcher
// nexusrt/kernels/ops/persistent.py packs it and a test checks both lists agree), so the
// launch has one argument and a captured graph replays it unchanged: the token id and the
// position are read from the state words on the device, as the graph path does.
//
// The last three opcodes are the sampler's. Greedy (the SampleParams struct the host writes per
// request says temperature 0): sampling.cu's two launches as instructions, argmax partials per
// LM-head chunk and a finish combining them; the gathers skip their waits and only signal, so
// greedy keeps its one grid-wide hop. Sampled: the grid-wide exact top-K of sampling_grid.cuh,
// partials adding their chunk's key histogram, gathers (after every partial) compacting their
// chunk's candidates into a pool, and a finish running sampling.cu's sort and draw on the pool
// (sample_topk over all logits when the pool overflowed) at the step in the state words: the
// same token as the graph path's for the same seed, from one captured launch whatever the
// parameters.
//
// The GEMV tiles load their weights with 16-byte loads after their wait, two rows in flight per
// warp. When the launch gives the block ring pages (NEXUSRT_PERSISTENT_RING=1 or loader, sm_90:
// slower on the H200) they read them instead from a shared-memory ring that the bulk-copy engine
// fills ahead of the instruction list (persistent_ring.cuh), its copies issued either by the
// readers themselves (the plain entries) or by a loader warpgroup of its own (the _loader entries:
// 384 threads, setmaxnreg moving the loader's registers to the compute warps).
//
// The tiles' barriers and loops cover the 256 compute threads only (block.cuh): the _loader
// entries' block also holds the loader warpgroup, which runs none of them.
#pragma once
#ifdef NRT_BLOCK_CUH
#error "include persistent_decode.cuh before anything that includes block.cuh: NRT_BLOCK_THREADS must come first"
#endif
#define NRT_BLOCK_THREADS 256
#include "persistent_attention.cuh"
#include "persistent_ring.cuh"

namespace {

using namespace nrt_pk;
static_assert(NRT_BLOCK_THREADS == kThreads, "the compute threads are the tiles' kThreads");

enum Slot : int {
    kEmbed, kLmHead, kFinalNorm, kInvFreq,
    kX, kQkv, kQ, kAttn, kMlp, kLogits,
    kPartMl, kPartAcc, kArgVal, kArgIdx, kSampleParams, kTopkHist, kTopkPool,
    kState, kRing, kBlockTable,
    kCounters, kTotals, kEpoch, kDebug, kProfile,
    kLayers, kProgram, kOffsets,
    kHidden, kInter, kVocab, kHq, kHkv, kSplits, kRingSize, kSliceRows, kEps, kScale,
    kNumSlots
};

enum LayerSlot : int {
    kAttnNorm, kWqkv, kQkvBias, kQNorm, kKNorm, kWo, kMlpNorm, kWgateUp, kWdown, kKPool, kVPool,
    kLayerSlots
};

enum Op : int {
    EMBED = 1, QKV, ROPE_APPEND, ATTENTION, ATTN_COMBINE, O_PROJ, GATE_UP, DOWN, LM_HEAD,
    SAMPLE_PARTIAL, SAMPLE_FINISH, SAMPLE_GATHER
};

constexpr int kRowWords = 16;
// kernels/ops/persistent.py FINISH_SHARED_BYTES sizes the dynamic shared memory with this.
static_assert(sizeof(PoolShared) == 42272, "update FINISH_SHARED_BYTES in kernels/ops/persistent.py");
static_assert(kBuckets * 4 <= (int)sizeof(PoolShared), "a partial's histogram overlays the finish's workspace");

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void red_release_add(unsigned* p, unsigned v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

template <typename T>
__device__ __forceinline__ T* slot_ptr(const u64* P, int s) { return reinterpret_cast<T*>(P[s]); }
__device__ __forceinline__ int slot_int(const u64* P, int s) { return (int)P[s]; }
__device__ __forceinline__ float slot_float(const u64* P, int s) { return __uint_as_float((unsigned)P[s]); }

// Whether this row's waits apply this step: a gather's wait (every partial) only orders the
// grid-wide top-K of a sampled step. In a greedy step the gather does nothing, so it signals at
// once and the finish, which waits for the partials itself, is not held back by a second hop.
// Skipping a wait only lets a row run earlier, so the no-deadlock order of lower.check holds.
__device__ __forceinline__ bool waits_apply(const int* row, const u64* P) {
    return row[0] != SAMPLE_GATHER || samples(reinterpret_cast<const SampleParams*>(P[kSampleParams]));
}

// Thread 0: spin until every wait of `row` holds. On a wait that never comes it records
// (sm, row index, counter, count this step, target) in the debug words and traps.
__device__ __forceinline__ void wait_row(const int* row, const u64* P, unsigned epoch, int index) {
    unsigned* counters = slot_ptr<unsigned>(P, kCounters);
    const int* totals = slot_ptr<const int>(P, kTotals);
    for (int w = 0; w < row[6]; ++w) {
        const int c = row[7 + 2 * w], target = row[8 + 2 * w];
        const unsigned base = epoch * (unsigned)__ldg(totals + c);
        unsigned ns = 32;
        unsigned long long since = 0;
        for (unsigned spin = 0;; ++spin) {
            const int have = (int)(ld_acquire(counters + c) - base);
            if (have >= target) break;
            // The clock every 64 tries (~8 us): a wait that is met soon never reads it.
            if ((spin & 63) == 63 && wait_expired(since))
                fail(slot_ptr<int>(P, kDebug), blockIdx.x + 1, index, c, have, target);
            // A short cap: the wake-up delay is paid at every stage boundary (~100 a step), and
            // one polling thread per SM costs L2 next to nothing.
            __nanosleep(ns);
            ns = ns < 128 ? ns * 2 : ns;
        }
    }
}

#ifdef NRT_HAS_BULK_COPY
// The row length K of the GEMV an opcode runs (0: not a GEMV). QW = Hq * D.
__device__ __forceinline__ int gemv_k(int op, int H, int I, int QW) {
    switch (op) {
    case QKV: case GATE_UP: case LM_HEAD: return H;
    case O_PROJ: return QW;
    case DOWN: return I;
    default: return 0;
    }
}

// The ring pages of one program row (ops/persistent.py ring_page_starts counts them the same way).
__device__ __forceinline__ int row_pages(const int* row, int H, int I, int QW) {
    const int K = gemv_k(row[0], H, I, QW);
    return K ? (row[3] - row[2]) * (row[0] == GATE_UP ? 2 : 1) * pages_per_row(K) : 0;
}

// Where an issuing thread is in the list for the pages it issues: the row of its last page and
// that row's layout. Each thread asks for increasing pages, so it only moves forward.
struct RingCursor {
    int row, begin, end;     // slice row; its pages [begin, end)
    int ppr, vp, outputs;    // pages a weight row; pages an output (gate/up: 2 ppr); outputs of the tile
    int a, upper;            // first output; the up rows' offset (gate/up)
    int row_bytes;
    const char* W;
};

// One thread (a warp's lane 0, thread 0 at the start, or a lane of the loader warp): page Q of this
// SM's step into `slot` as its copy `fill`.
__device__ __forceinline__ void ring_issue(const WeightRing& ring, int Q, int slot, int fill, RingCursor& c,
                                           const int* slice, const u64* P, const u64* layers, int H, int I, int QW) {
    while (Q >= c.end) {
        const int* row = slice + (size_t)(++c.row) * kRowWords;
        const int op = row[0], K = gemv_k(op, H, I, QW);
        c.begin = c.end = row[15];
        if (K == 0) continue;
        c.ppr = pages_per_row(K);
        c.vp = (op == GATE_UP ? 2 : 1) * c.ppr;
        c.outputs = row[3] - row[2];
        c.a = row[2];
        c.upper = op == GATE_UP ? I : 0;
        c.row_bytes = 2 * K;
        c.end = c.begin + c.outputs * c.vp;
        int w_slot = kWqkv;
        switch (op) {
        case O_PROJ: w_slot = kWo; break;
        case GATE_UP: w_slot = kWgateUp; break;
        case DOWN: w_slot = kWdown; break;
        default: break;
        }
        c.W = op == LM_HEAD ? slot_ptr<const char>(P, kLmHead)
                            : reinterpret_cast<const char*>(__ldg(layers + (size_t)row[1] * kLayerSlots + w_slot));
    }
    int v, piece;
    tile_page(Q - c.begin, c.outputs, c.vp, v, piece);
    int w_row = c.a + v;
    if (piece >= c.ppr) w_row += c.upper, piece -= c.ppr;  // gate/up: the up row's pieces follow the gate row's
    ring_fill(ring, slot, fill, c.W + (size_t)w_row * c.row_bytes + (size_t)piece * kPageBytes,
              (unsigned)min(kPageBytes, c.row_bytes - piece * kPageBytes));
}

// The loader warpgroup's first warp: every page of this SM's step in list order, each into its slot
// as soon as the page before it there has been read. Lane l takes pages l, l + B, l + 2B, ... (B =
// min(32, n) lanes, so the lanes' pages in flight never share a slot): one thread issuing every
// page in turn could not keep up with the readers (H200: 8B 10.7 ms/token against 6.6 with the
// warp). Each lane walks the list with a cursor of its own, so it only moves forward. No
// deadlock: the lowest page not yet issued waits only for the page n below it, which was issued,
// and whose reader, reading its own pages in increasing order, waits for nothing unissued.
__device__ __noinline__ void ring_load(const WeightRing& ring, const int* slice, const u64* P, const u64* layers,
                                       int H, int I, int QW) {
    const int lane = threadIdx.x & 31, lanes = min(32, ring.n);
    if (lane >= lanes) return;
    RingCursor c;
    c.row = -1, c.end = 0;
    int slot = lane, fill = 0;  // page q is copy q / n of slot q % n
    for (int q = lane; q < ring.total; q += lanes) {
        if (fill > 0) ring_wait_read(ring, slot, fill, q);
        ring_issue(ring, q, slot, fill, c, slice, P, layers, H, I, QW);
        slot += lanes;
        if (slot >= ring.n) slot -= ring.n, ++fill;
    }
}

// The loader entries' register split (setmaxnreg): the launch gives each of the 384 threads 168;
// the loader warpgroup keeps 40 and the two compute warpgroups take 232 (128 * 40 + 256 * 232 =
// 384 * 168 registers).
constexpr int kLoaderThreads = 128;
constexpr int kLoaderRegs = 40, kComputeRegs = 232;
static_assert(kLoaderThreads * kLoaderRegs + kThreads * kComputeRegs <= (kThreads + kLoaderThreads) * 168,
              "the split must fit the registers the launch gave");
#endif

// kLoader: the block has a loader warpgroup past the kThreads compute threads (the _loader
// entries), which streams the weight ring; without it the readers hand their slots on themselves.
template <int D, int GM, bool kLoader>
__device__ void run(const u64* __restrict__ params) {
    __shared__ u64 P[kNumSlots];
    __shared__ unsigned epoch_s;
    __shared__ float scratch[32];
    __shared__ int iscratch[32];
    __shared__ PoolPlan plan_sh;
    __shared__ AttnShared<D, GM> attn_sh;
    extern __shared__ float4 dyn_smem[];
    float* xs = reinterpret_cast<float*>(dyn_smem);  // the staged GEMV input, max(H, I, Hq*D) floats

    const int tid = threadIdx.x;
    for (int i = tid; i < kNumSlots; i += kThreads) P[i] = params[i];
    __syncthreads();
    unsigned* epoch_words = slot_ptr<unsigned>(P, kEpoch);  // [epoch, exit ticket]
    const int H = slot_int(P, kHidden), I = slot_int(P, kInter), V = slot_int(P, kVocab);
    const int Hq = slot_int(P, kHq), Hkv = slot_int(P, kHkv), S = slot_int(P, kSplits);
    const int G = Hq / Hkv;
    const float eps = slot_float(P, kEps);
    const int* program = slot_ptr<const int>(P, kProgram);
    const int* offsets = slot_ptr<const int>(P, kOffsets);
    int* state = slot_ptr<int>(P, kState);  // [pos, step, token, 0]
    const u64* layers = slot_ptr<const u64>(P, kLayers);
    unsigned long long* profile = slot_ptr<unsigned long long>(P, kProfile);  // null: not profiling
    int staged = -1;  // (op << 16 | layer) whose input xs holds: a GEMV stage's input is constant while it runs

    // This SM's whole instruction list goes to shared memory once (after the staged input; the
    // launcher sizes it from the longest list): every row read is then a shared-memory read, not
    // an L2 round trip on thread 0's path before each instruction's wait.
    const int begin = __ldg(offsets + blockIdx.x), end = __ldg(offsets + blockIdx.x + 1);
    if (end - begin > slot_int(P, kSliceRows))  // the launcher sized the slice from these offsets
        fail(slot_ptr<int>(P, kDebug), -(blockIdx.x + 1), end - begin, -1, 0, 0);  // every thread: the same words
    // The slice starts past the larger user of the area before it: the staged GEMV input or the
    // sampling finish's workspace (kernels/ops/persistent.py shared_bytes, the same rule).
    const int lead_words = max(max(max(H, I), Hq * D), (int)(sizeof(PoolShared) / 4));
    int* slice = reinterpret_cast<int*>(dyn_smem) + ((lead_words + 3) & ~3);
    if (tid < kThreads) {
        const int4* src = reinterpret_cast<const int4*>(program + (size_t)begin * kRowWords);
        int4* dst = reinterpret_cast<int4*>(slice);
        for (int i = tid; i < (end - begin) * (kRowWords / 4); i += kThreads) dst[i] = __ldg(src + i);
    }
    if (tid == 0) {
        epoch_s = __ldcg(epoch_words);
    }
    __syncthreads();
    const unsigned epoch = epoch_s;
    const int QW = Hq * D;
#ifdef NRT_HAS_BULK_COPY
    // The weight ring fills the dynamic shared memory past the longest list (the launcher sizes
    // it); its barriers are initialised before the first instruction's barrier, which every
    // reader passes before its first wait.
    __shared__ alignas(8) unsigned long long ring_full[kMaxPages];
    __shared__ int ring_fills[kMaxPages];
    __shared__ RingCursor cursors[kWarps];  // each warp's lane 0's (shared memory: registers are short)
    WeightRing ring;
    ring.pages = reinterpret_cast<uint4*>(slice + (size_t)slot_int(P, kSliceRows) * kRowWords);
    ring.full = ring_full;
    ring.fills = ring_fills;
    ring.debug = slot_ptr<int>(P, kDebug);
    ring.n = min(kMaxPages, ((int)dynamic_smem_bytes() - (int)(reinterpret_cast<char*>(ring.pages) -
                                                               reinterpret_cast<char*>(dyn_smem))) / kPageBytes);
    ring.total = 0;
    if (end > begin) {
        const int* last = slice + (size_t)(end - begin - 1) * kRowWords;
        ring.total = last[15] + row_pages(last, H, I, QW);
    }
    if (ring.n < 1) ring.n = 0, ring.total = 0;  // no ring (the launcher's switch): 16-byte loads
    ring.empty = nullptr;
    if constexpr (kLoader) {
        __shared__ alignas(8) unsigned long long ring_empty[kMaxPages];
        ring.empty = ring_empty;
    }
    RingCursor& cursor = cursors[(tid >> 5) % kWarps];
    // A reader done with page q of `slot`: with a loader, it says so on the slot's barrier; without
    // one, it issues page q + n into the slot itself.
    auto refill = [&](int q, int slot, int fill) {
        if constexpr (kLoader) nrt::mbar_arrive(ring.empty + slot);
        else ring_issue(ring, q, slot, fill, cursor, slice, P, layers, H, I, QW);
    };
    if ((tid & 31) == 0 && tid < kThreads) cursor.row = -1, cursor.end = 0;  // the readers' warps (not the loader's)
    if (tid == 0) {
        for (int i = 0; i < ring.n; ++i) {
            nrt::mbar_init(ring_full + i, 1), ring_fills[i] = 0;
            if constexpr (kLoader) nrt::mbar_init(ring.empty + i, 1);
        }
        nrt::mbar_init_fence();
        if constexpr (!kLoader)
            for (int q = 0; q < min(ring.n, ring.total); ++q) refill(q, q, 0);
    }
    if constexpr (kLoader) {
        __syncthreads();  // the barriers exist before the loader's first copy
        if (tid >= kThreads) {
            nrt::warpgroup_regs_down<kLoaderRegs>();
            if (tid < kThreads + 32) ring_load(ring, slice, P, layers, H, I, QW);
            return;
        }
        nrt::warpgroup_regs_up<kComputeRegs>();
    }
#endif

    for (int index = begin; index < end; ++index) {
        const int* row_s = slice + (size_t)(index - begin) * kRowWords;
        // Thread 0 spins on the row's waits, and the barrier hands the CTA on (bar.sync orders the
        // others after its acquire).
        if (tid == 0) {
            if (profile) profile[3 * (size_t)index] = clock64();
            if (waits_apply(row_s, P)) wait_row(row_s, P, epoch, index);
            if (profile) profile[3 * (size_t)index + 1] = clock64();
        }
        nrt::block_sync();
        const int op = row_s[0], layer = row_s[1], a = row_s[2], b = row_s[3], arg = row_s[4], signal = row_s[5];

        const u64* L = layers + (size_t)layer * kLayerSlots;
        const int key = op << 16 | layer;
        // A GEMV tile (rows [a, b) of y = W . xs, N outputs, rows of K): from the ring when the launch
        // gave one (the row's first page in its pad word), else by 16-byte loads from W.
#ifdef NRT_HAS_BULK_COPY
#define GEMV(y, W, bias, kind, N, K)                                                   \
    if (ring.n) gemv_tile_ring(y, xs, bias, kind, a, b, K, ring, row_s[15], refill); \
    else gemv_tile<(GM < 8)>(y, W, xs, bias, kind, a, b, N, K)
#else
#define GEMV(y, W, bias, kind, N, K) gemv_tile<(GM < 8)>(y, W, xs, bias, kind, a, b, N, K)
#endif
        switch (op) {
        case EMBED:
            embed_tile(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(P, kEmbed), __ldcg(state + 2), H, V);
            break;
        case QKV:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(L, kAttnNorm), eps, H, scratch);
            GEMV(slot_ptr<float>(P, kQkv), slot_ptr<const __nv_bfloat16>(L, kWqkv), slot_ptr<const float>(L, kQkvBias),
                 L[kQkvBias] ? kBiasF32 : kPlain, 0, H);
            break;
        case ROPE_APPEND:
            for (int kv = a; kv < b; ++kv)
                rope_tile<D>(slot_ptr<const float>(P, kQkv), slot_ptr<float>(P, kQ), slot_ptr<__nv_bfloat16>(L, kKPool),
                             slot_ptr<__nv_bfloat16>(L, kVPool), slot_ptr<const int>(P, kBlockTable), __ldcg(state), kv,
                             Hq, Hkv, slot_ptr<const float>(P, kInvFreq), slot_ptr<const float>(L, kQNorm),
                             slot_ptr<const float>(L, kKNorm), eps);
            break;
        case ATTENTION:
            for (int kv = a; kv < b; ++kv) {
                attention_tile<D, GM>(attn_sh, slot_ptr<const float>(P, kQ), slot_ptr<float>(P, kAttn),
                                      slot_ptr<float>(P, kPartAcc), slot_ptr<float2>(P, kPartMl),
                                      slot_ptr<const __nv_bfloat16>(L, kKPool), slot_ptr<const __nv_bfloat16>(L, kVPool),
                                      slot_ptr<const int>(P, kBlockTable), __ldcg(state), kv, arg, S, Hkv, G,
                                      slot_float(P, kScale));
                nrt::block_sync();  // attn_sh is reused by the next head
            }
            break;
        case ATTN_COMBINE:
            for (int kv = a; kv < b; ++kv) {
                combine_tile<D, GM>(attn_sh, slot_ptr<float>(P, kAttn), slot_ptr<const float>(P, kPartAcc),
                                    slot_ptr<const float2>(P, kPartMl), kv, arg, G);
                nrt::block_sync();
            }
            break;
        case O_PROJ:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kAttn), nullptr, eps, Hq * D, scratch);
            GEMV(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(L, kWo), nullptr, kResidual, H, QW);
            break;
        case GATE_UP:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(L, kMlpNorm), eps, H, scratch);
            GEMV(slot_ptr<float>(P, kMlp), slot_ptr<const __nv_bfloat16>(L, kWgateUp), nullptr, kGateUp, I, H);
            break;
        case DOWN:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kMlp), nullptr, eps, I, scratch);
            GEMV(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(L, kWdown), nullptr, kResidual, H, I);
            break;
        case LM_HEAD:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(P, kFinalNorm), eps, H, scratch);
            GEMV(slot_ptr<float>(P, kLogits), slot_ptr<const __nv_bfloat16>(P, kLmHead), nullptr, kPlain, V, H);
            break;
        case SAMPLE_PARTIAL:
            // A sampled step's histogram overlays the staged GEMV input (every LM-head tile is
            // earlier in this SM's list), so nothing staged survives this instruction.
            sample_partial_tile(slot_ptr<const float>(P, kLogits), a, b, arg, slot_ptr<const SampleParams>(P, kSampleParams),
                                slot_ptr<float>(P, kArgVal), slot_ptr<int>(P, kArgIdx), slot_ptr<unsigned>(P, kTopkHist),
                                reinterpret_cast<unsigned*>(dyn_smem), scratch, iscratch);
            staged = -1;
            break;
        case SAMPLE_GATHER:
            // A sampled step's candidate stage overlays the staged GEMV input, as the partial's
            // histogram does.
            if (samples(slot_ptr<const SampleParams>(P, kSampleParams))) {
                sample_gather_tile(slot_ptr<const float>(P, kLogits), a, b, V, slot_ptr<const SampleParams>(P, kSampleParams),
                                   slot_ptr<unsigned>(P, kTopkHist), slot_ptr<unsigned long long>(P, kTopkPool),
                                   reinterpret_cast<unsigned long long*>(dyn_smem), lead_words / 2, iscratch, plan_sh);
                staged = -1;
            }
            break;
        case SAMPLE_FINISH:
            // The top-K workspace overlays the staged GEMV input (the launcher sizes the dynamic
            // shared memory for both), so nothing staged survives this instruction.
            sample_finish_tile(slot_ptr<const float>(P, kLogits), V, slot_ptr<const SampleParams>(P, kSampleParams),
                               slot_ptr<const float>(P, kArgVal), slot_ptr<const int>(P, kArgIdx), arg,
                               slot_ptr<unsigned>(P, kTopkHist), slot_ptr<const unsigned long long>(P, kTopkPool), state,
                               slot_ptr<int>(P, kRing), slot_int(P, kRingSize),
                               *reinterpret_cast<PoolShared*>(dyn_smem), scratch, iscratch);
            staged = -1;
            break;
        default:
            fail(slot_ptr<int>(P, kDebug), -(blockIdx.x + 1), index, op, 0, 0);  // every thread: the same words
        }
#undef GEMV
        if (op == QKV || op == O_PROJ || op == GATE_UP || op == DOWN || op == LM_HEAD) staged = key;
        nrt::block_sync();  // every store of the tile issued (and xs / attn_sh free for the next)
        if (tid == 0 && signal >= 0) {
            __threadfence();
            red_release_add(slot_ptr<unsigned>(P, kCounters) + signal, 1u);
        }
        if (tid == 0 && profile) profile[3 * (size_t)index + 2] = clock64();
    }

    // The last CTA out advances the epoch for the next launch and rezeroes the ticket.
    if (tid == 0) {
        __threadfence();
        const unsigned ticket = atomicAdd(epoch_words + 1, 1u);
        if (ticket == gridDim.x - 1) {
            epoch_words[1] = 0u;
            epoch_words[0] = epoch + 1u;
            __threadfence();
        }
    }
}

}  // namespace

// Every (head_dim, query heads per KV head bound) an entry is compiled for: ops/persistent.py
// HEAD_DIMS x GROUP_BOUNDS. Each entry module applies its entry macro to this list.
#define NRT_PERSISTENT_SHAPES(ENTRY) \
    ENTRY(64, 1) ENTRY(64, 2) ENTRY(64, 4) ENTRY(64, 8) ENTRY(128, 1) ENTRY(128, 2) ENTRY(128, 4) ENTRY(128, 8)
