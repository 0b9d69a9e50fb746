// bulk_copy.cuh: the sm_90 bulk-copy engine (cp.async.bulk, global -> shared) and the
// transaction-counting mbarriers that say when a copy has landed. One thread issues a copy of
// up to a few KB with one instruction; the bytes arrive without registers or LSU slots of the
// issuing warp, and the barrier's phase flips once every byte it expects has been written.
//
// Use: init a barrier (count 1) and fence the init; per fill, one thread calls arrive_expect_tx
// with the fill's total bytes and issues the copies against the same barrier; readers wait on
// the barrier's parity for that fill (0 for the first fill, then alternating). Before a slot is
// refilled, every reader must be done with it (the caller's sync) and the issuing thread
// fences the generic proxy's accesses against the async proxy's write (fence_proxy_async).
// Sizes and addresses are multiples of 16 bytes.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define NRT_HAS_BULK_COPY 1

namespace nrt {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Makes barrier inits visible to the async proxy (the bulk copies that complete on them).
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}

// Spin until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n\t.reg .pred done;\n"  // the label is local to this brace scope
        "nrt_wait:\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
        "@!done bra nrt_wait;\n}" ::"r"(smem_u32(bar)), "r"(parity)
        : "memory");
}

// Whether the barrier's phase with this parity has completed; while it has not, the thread may
// sleep in the instruction (up to about a millisecond) instead of spinning. The caller loops.
__device__ __forceinline__ bool mbar_try_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, 1000000;\n\t"
        "selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// One arrival on a plain barrier (count 1: a reader saying it is done with a slot). Release
// semantics at CTA scope: the arriving thread's earlier accesses come before the phase's end.
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

// Copy ``bytes`` from global ``src`` to shared ``dst``; completes ``bytes`` of ``bar``'s
// expected transactions. (The CTA's own shared memory is a valid shared::cluster address.)
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}

// bulk_load of a range that may straddle the memory arena's 2 MiB mappings (memory/provider_cuda.py
// maps a tensor in pieces of that size): one copy per mapping it touches, so each copy reads inside
// one mapping (compute-sanitizer reported a straddling copy out of bounds). At most two pieces for
// `bytes` <= 2 MiB. The caller's expect_tx covers `bytes` in all.
constexpr unsigned long long kMapBytes = 2ull << 20;
__device__ __forceinline__ void bulk_load_mapped(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    const unsigned long long room = kMapBytes - (reinterpret_cast<unsigned long long>(src) & (kMapBytes - 1));
    const unsigned first = room < bytes ? (unsigned)room : bytes;
    bulk_load(dst, src, first, bar);
    if (first < bytes)
        bulk_load(static_cast<char*>(dst) + first, static_cast<const char*>(src) + first, bytes - first, bar);
}

// Order this thread's (and, after a warp/block sync, its peers') generic shared-memory reads
// before a following async-proxy write to the same bytes.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// A warpgroup's register budget (every warp of the four executes it): a warpgroup that only
// issues copies gives registers back, and the compute warpgroups take them, so a block can hold a
// loader warpgroup beside warps that need ~240 registers. sm_90a only (the arch-specific
// features); elsewhere the budget stays the launch's.
template <int N>
__device__ __forceinline__ void warpgroup_regs_down() {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void warpgroup_regs_up() {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
#endif
}

}  // namespace nrt

#endif  // sm_90+
