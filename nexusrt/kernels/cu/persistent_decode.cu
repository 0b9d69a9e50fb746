// The persistent decode kernel (issue 15; design: nexusrt/kernels/NOTES_persistent.md): a
// whole decode step in one launch. Grid = number of SMs, one CTA per SM (launched
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
// Missing (NOTES_persistent.md, "Known missing"): the loader warp / cp.async.bulk weight ring
// (tiles load their weights with 16-byte loads after their wait, two rows in flight per warp),
// warp specialisation.
#include "persistent_attention.cuh"

namespace {

using namespace nrt_pk;

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
constexpr long long kSpinLimit = 1ll << 26;  // ~9 s of 128 ns backoff: a deadlock traps, it does not hang

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
        for (long long spin = 0;; ++spin) {
            const int have = (int)(ld_acquire(counters + c) - base);
            if (have >= target) break;
            if (spin == kSpinLimit) {
                int* dbg = slot_ptr<int>(P, kDebug);
                dbg[0] = blockIdx.x + 1; dbg[1] = index; dbg[2] = c; dbg[3] = have; dbg[4] = target;
                __threadfence_system();
                __trap();
            }
            // A short cap: the wake-up delay is paid at every stage boundary (~100 a step), and
            // one polling thread per SM costs L2 next to nothing.
            __nanosleep(ns);
            ns = ns < 128 ? ns * 2 : ns;
        }
    }
}

template <int D, int GM>
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
    if (end - begin > slot_int(P, kSliceRows)) {  // the launcher sized the slice from these offsets
        if (tid == 0) {
            int* dbg = slot_ptr<int>(P, kDebug);
            dbg[0] = -(blockIdx.x + 1); dbg[1] = end - begin; dbg[2] = -1;
            __threadfence_system();
        }
        __trap();
    }
    // The slice starts past the larger user of the area before it: the staged GEMV input or the
    // sampling finish's workspace (kernels/ops/persistent.py shared_bytes, the same rule).
    const int lead_words = max(max(max(H, I), Hq * D), (int)(sizeof(PoolShared) / 4));
    int* slice = reinterpret_cast<int*>(dyn_smem) + ((lead_words + 3) & ~3);
    {
        const int4* src = reinterpret_cast<const int4*>(program + (size_t)begin * kRowWords);
        int4* dst = reinterpret_cast<int4*>(slice);
        for (int i = tid; i < (end - begin) * (kRowWords / 4); i += kThreads) dst[i] = __ldg(src + i);
    }
    if (tid == 0) {
        epoch_s = __ldcg(epoch_words);
    }
    __syncthreads();
    const unsigned epoch = epoch_s;

    for (int index = begin; index < end; ++index) {
        const int* row_s = slice + (size_t)(index - begin) * kRowWords;
        // Thread 0 spins on the row's waits, and the barrier hands the CTA on (bar.sync orders the
        // others after its acquire).
        if (tid == 0) {
            if (profile) profile[3 * (size_t)index] = clock64();
            if (waits_apply(row_s, P)) wait_row(row_s, P, epoch, index);
            if (profile) profile[3 * (size_t)index + 1] = clock64();
        }
        __syncthreads();
        const int op = row_s[0], layer = row_s[1], a = row_s[2], b = row_s[3], arg = row_s[4], signal = row_s[5];

        const u64* L = layers + (size_t)layer * kLayerSlots;
        const int key = op << 16 | layer;
        switch (op) {
        case EMBED:
            embed_tile(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(P, kEmbed), __ldcg(state + 2), H, V);
            break;
        case QKV:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(L, kAttnNorm), eps, H, scratch);
            gemv_tile<(GM < 8)>(slot_ptr<float>(P, kQkv), slot_ptr<const __nv_bfloat16>(L, kWqkv), xs,
                      slot_ptr<const float>(L, kQkvBias), L[kQkvBias] ? kBiasF32 : kPlain, a, b, 0, H);
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
                __syncthreads();  // attn_sh is reused by the next head
            }
            break;
        case ATTN_COMBINE:
            for (int kv = a; kv < b; ++kv) {
                combine_tile<D, GM>(attn_sh, slot_ptr<float>(P, kAttn), slot_ptr<const float>(P, kPartAcc),
                                    slot_ptr<const float2>(P, kPartMl), kv, arg, G);
                __syncthreads();
            }
            break;
        case O_PROJ:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kAttn), nullptr, eps, Hq * D, scratch);
            gemv_tile<(GM < 8)>(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(L, kWo), xs, nullptr, kResidual, a, b, H, Hq * D);
            break;
        case GATE_UP:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(L, kMlpNorm), eps, H, scratch);
            gemv_tile<(GM < 8)>(slot_ptr<float>(P, kMlp), slot_ptr<const __nv_bfloat16>(L, kWgateUp), xs, nullptr, kGateUp, a, b, I, H);
            break;
        case DOWN:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kMlp), nullptr, eps, I, scratch);
            gemv_tile<(GM < 8)>(slot_ptr<float>(P, kX), slot_ptr<const __nv_bfloat16>(L, kWdown), xs, nullptr, kResidual, a, b, H, I);
            break;
        case LM_HEAD:
            if (staged != key) stage_input(xs, slot_ptr<const float>(P, kX), slot_ptr<const float>(P, kFinalNorm), eps, H, scratch);
            gemv_tile<(GM < 8)>(slot_ptr<float>(P, kLogits), slot_ptr<const __nv_bfloat16>(P, kLmHead), xs, nullptr, kPlain, a, b, V, H);
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
            if (tid == 0) {
                int* dbg = slot_ptr<int>(P, kDebug);
                dbg[0] = -(blockIdx.x + 1); dbg[1] = index; dbg[2] = op;
                __threadfence_system();
            }
            __trap();
        }
        if (op == QKV || op == O_PROJ || op == GATE_UP || op == DOWN || op == LM_HEAD) staged = key;
        __syncthreads();  // every store of the tile issued (and xs / attn_sh free for the next)
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

// persistent_decode_d<D>_g<GM>: head_dim D, up to GM query heads per KV head (the launcher
// picks the smallest GM >= G). params: u64 [kNumSlots]. grid = SM count, block 256, one CTA
// per SM, dynamic shared memory max(4 * max(H, I, Hq * D), sizeof(PoolShared)) bytes, then the
// SM's instruction list.
#define NRT_PERSISTENT(D, GM)                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                      \
        persistent_decode_d##D##_g##GM(const unsigned long long* params) {                         \
        run<D, GM>(params);                                                                        \
    }

NRT_PERSISTENT(64, 1)
NRT_PERSISTENT(64, 2)
NRT_PERSISTENT(64, 4)
NRT_PERSISTENT(64, 8)
NRT_PERSISTENT(128, 1)
NRT_PERSISTENT(128, 2)
NRT_PERSISTENT(128, 4)
NRT_PERSISTENT(128, 8)
