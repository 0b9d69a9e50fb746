// block.cuh: the thread block as shared device code sees it, its thread count and its barriers.
//
// Most kernels run every thread of the block through this code, and these are __syncthreads and
// blockDim.x. The persistent decode kernel's warp-specialised entries also hold a loader
// warpgroup that never runs it (persistent_decode.cuh): that header defines
// NRT_BLOCK_THREADS to its compute threads before including anything, and the barriers become
// named barriers over those threads only (a block barrier would wait for the loader forever).
// Named barrier 0 is __syncthreads's own; 1 and 2 are taken here.
#pragma once
#define NRT_BLOCK_CUH 1  // persistent_decode.cuh checks it was included first

namespace nrt {

#ifdef NRT_BLOCK_THREADS
static_assert(NRT_BLOCK_THREADS % 32 == 0, "a named barrier counts whole warps");

__device__ __forceinline__ unsigned block_threads() { return NRT_BLOCK_THREADS; }

__device__ __forceinline__ void block_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(NRT_BLOCK_THREADS) : "memory");
}

// How many of the compute threads pass `pred` (every one of them gets the count).
__device__ __forceinline__ int block_count(bool pred) {
    int n;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "setp.ne.u32 p, %1, 0;\n\t"
        "bar.red.popc.u32 %0, 2, %2, p;\n}"
        : "=r"(n)
        : "r"((unsigned)pred), "n"(NRT_BLOCK_THREADS)
        : "memory");
    return n;
}

// Whether any compute thread passes `pred`.
__device__ __forceinline__ bool block_or(bool pred) {
    unsigned r;
    asm volatile(
        "{\n\t.reg .pred p, q;\n\t"
        "setp.ne.u32 p, %1, 0;\n\t"
        "bar.red.or.pred q, 2, %2, p;\n\t"
        "selp.u32 %0, 1, 0, q;\n}"
        : "=r"(r)
        : "r"((unsigned)pred), "n"(NRT_BLOCK_THREADS)
        : "memory");
    return r != 0;
}
#else
__device__ __forceinline__ unsigned block_threads() { return blockDim.x; }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ int block_count(bool pred) { return __syncthreads_count(pred); }
__device__ __forceinline__ bool block_or(bool pred) { return __syncthreads_or(pred) != 0; }
#endif

}  // namespace nrt
