// Shared device helpers for NexusRT kernels: constants, loads, reductions, RNG.
// Every kernel source includes this; keep it small and dependency-free (NVRTC has no libstdc++).
#pragma once

#include "block.cuh"
#include "pdl.cuh"

#include <cuda_bf16.h>

// Tokens per KV block ("page" here is the kernels' old word for it; Python: nexusrt.kvcache.blocks.BLOCK_SIZE).
#define NRT_PAGE_SIZE 16

namespace nrt {

typedef unsigned int u32;
typedef unsigned long long u64;

// 16-byte read-only streaming load. Weights are read once per token and the working set
// exceeds the L2, so we skip L1 allocation (keeps L1 for the staged activations) and
// ask the L2 to fetch whole 256-byte sectors; compiles to LDG.E.128.CONSTANT.
__device__ __forceinline__ uint4 ld_stream_128(const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
#else  // older parts (T4, P100 profiles): the plain read-only path
    return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

// A bf16 pair packed in a 32-bit word: the low half is the element with the lower address.
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    return __uint_as_float(((u32)b) << 16);
}

// Dot product of 8 bf16 weights (one 16-byte chunk) with x[0..7] split into two float4s.
// Fixed evaluation order so results are run-to-run identical.
__device__ __forceinline__ float dot8(uint4 w, float4 a, float4 b) {
    float s = bf16_lo(w.x) * a.x;
    s = fmaf(bf16_hi(w.x), a.y, s);
    s = fmaf(bf16_lo(w.y), a.z, s);
    s = fmaf(bf16_hi(w.y), a.w, s);
    s = fmaf(bf16_lo(w.z), b.x, s);
    s = fmaf(bf16_hi(w.z), b.y, s);
    s = fmaf(bf16_lo(w.w), b.z, s);
    s = fmaf(bf16_hi(w.w), b.w, s);
    return s;
}

// Butterfly sum: every lane ends with the same total (deterministic order).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the total. ``scratch`` holds >= 32 floats.
// Starts with a barrier so back-to-back calls may reuse the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (nrt::block_threads() + 31) >> 5;
    v = warp_sum(v);
    nrt::block_sync();
    if (lane == 0) scratch[warp] = v;
    nrt::block_sync();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// The RNG shared with the CPU (KERNELS.md): splitmix64 and uniform(seed, i) in [0, 1).
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    u64 z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ double uniform01(u64 seed, u64 i) {
    return (double)(splitmix64(seed * 0x9E3779B97F4A7C15ull + i) >> 11) * 0x1.0p-53;
}

}  // namespace nrt
