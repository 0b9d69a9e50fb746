// Argmax with the sampler's tie rule: larger value, then lower index; NaN never wins.
// Shared by sampling.cu and persistent_decode.cuh (its greedy partials and finish).
#pragma once

#include <cuda/std/climits>

#include "block.cuh"

namespace nrt_argmax {

// Is (v, i) better than (best, bi)? Larger value, then lower index; NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float best, int bi) {
    return v > best || (v == best && i < bi);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

// Block-wide argmax; every thread gets the result. `sv`/`si` hold one slot per warp.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = nrt::block_threads() >> 5;
    warp_argmax(v, i);
    nrt::block_sync();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    nrt::block_sync();
    v = lane < nwarps ? sv[lane] : -__int_as_float(0x7f800000);
    i = lane < nwarps ? si[lane] : INT_MAX;
    warp_argmax(v, i);
}

}  // namespace nrt_argmax
