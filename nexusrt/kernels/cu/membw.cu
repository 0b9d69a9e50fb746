// Read-bandwidth probe: sum every 32-bit word of a large buffer with 16-byte streaming loads.
// The decode benchmark divides bytes per token by this figure to get its floor, so the probe
// must really read every byte: each block stores its sum and the host checks the total
// against the buffer's known contents, which the compiler cannot predict.
#include "common.cuh"

// partial[blockIdx.x] = sum (mod 2^32) of the words this block read. n16 = 16-byte vectors.
// Grid-stride with 4 independent loads per thread per iteration; the tail is handled by the
// plain loop after it.
extern "C" __global__ void __launch_bounds__(512) membw_read(unsigned int* partial, const uint4* buf,
                                                            unsigned long long n16) {
    __shared__ unsigned int sums[32];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        const uint4 a = nrt::ld_stream_128(buf + i);
        const uint4 b = nrt::ld_stream_128(buf + i + stride);
        const uint4 c = nrt::ld_stream_128(buf + i + 2 * stride);
        const uint4 d = nrt::ld_stream_128(buf + i + 3 * stride);
        acc += (a.x + a.y + a.z + a.w) + (b.x + b.y + b.z + b.w) + (c.x + c.y + c.z + c.w) +
               (d.x + d.y + d.z + d.w);
    }
    for (; i < n16; i += stride) {
        const uint4 a = nrt::ld_stream_128(buf + i);
        acc += a.x + a.y + a.z + a.w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int t = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sums[w];
        partial[blockIdx.x] = t;
    }
}
