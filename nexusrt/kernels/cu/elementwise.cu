// Small elementwise kernels of the decode/prefill path: embedding, bf16 RMSNorm rows and
// SiLU*mul for the prefill, dtype conversions, and the on-device uniform fill used for
// synthetic weights.
// The residual stream is fp32; weights/tables are bf16. The prefill's tensor-core GEMMs read
// bf16 operands, so two kernels here write bf16: the normalised rows (rms_norm_bf16) and the
// gated MLP activation (silu_mul_bf16).
#include "common.cuh"

// out[m, :] = float(table[ids[m], :]) for m < M. ids come from DEVICE memory (the sampled
// token of the previous step), so a captured graph replays unchanged. An id outside
// [0, V) writes a NaN row: a bad id must never pass as plausible numbers.
extern "C" __global__ void embedding(float* out, const int* ids, const __nv_bfloat16* table,
                                     int M, int H, int V) {
    nrt::pdl_enter();
    const int m = blockIdx.y;
    if (m >= M) return;
    const int id = ids[m];
    const bool ok = id >= 0 && id < V;
    const unsigned short* row = reinterpret_cast<const unsigned short*>(table) + (size_t)(ok ? id : 0) * H;
    float* o = out + (size_t)m * H;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H; i += gridDim.x * blockDim.x)
        o[i] = ok ? nrt::bf16_bits_to_float(row[i]) : __int_as_float(0x7fc00000);
}

// RMSNorm of fp32 rows into bf16 rows (the A operand of the next GEMM), one warp per row,
// 16-byte loads: out = bf16(x * rsqrt(mean(x^2) + eps) * w), rounded once. cols % 8 == 0.
extern "C" __global__ void rms_norm_bf16(__nv_bfloat16* out, const float* x, const float* w, int rows,
                                         int cols, float eps) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const float4* xr = reinterpret_cast<const float4*>(x + (size_t)r * cols);
    const float4* wr = reinterpret_cast<const float4*>(w);
    float ss = 0.0f;
    for (int i = lane; i < cols / 4; i += 32) {
        const float4 v = xr[i];
        ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
    }
    ss = nrt::warp_sum(ss);
    const float rstd = 1.0f / sqrtf(ss / (float)cols + eps);
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out + (size_t)r * cols);
    for (int i = lane; i < cols / 4; i += 32) {
        const float4 v = xr[i], g = wr[i];
        o[2 * i] = __floats2bfloat162_rn(v.x * rstd * g.x, v.y * rstd * g.y);
        o[2 * i + 1] = __floats2bfloat162_rn(v.z * rstd * g.z, v.w * rstd * g.w);
    }
}

// The gated MLP activation on the bf16 output of the fused gate_up GEMM: gu [rows, 2I] holds
// gate in columns 0..I-1 and up in I..2I-1; out[r, c] = bf16(silu(gate) * up), computed in
// fp32 and rounded once. 8 columns per thread (16-byte loads); cols % 8 == 0.
extern "C" __global__ void silu_mul_bf16(__nv_bfloat16* out, const __nv_bfloat16* gu, int rows, int cols) {
    const int r = blockIdx.y;
    if (r >= rows) return;
    const uint4* g = reinterpret_cast<const uint4*>(gu + (size_t)r * 2 * cols);
    const uint4* u = reinterpret_cast<const uint4*>(gu + (size_t)r * 2 * cols + cols);
    uint4* o = reinterpret_cast<uint4*>(out + (size_t)r * cols);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols / 8; c += gridDim.x * blockDim.x) {
        const uint4 gv = g[c], uv = u[c];
        const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
        unsigned ow[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float a = nrt::silu(nrt::bf16_lo(gw[k])) * nrt::bf16_lo(uw[k]);
            const float b = nrt::silu(nrt::bf16_hi(gw[k])) * nrt::bf16_hi(uw[k]);
            const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
            ow[k] = *reinterpret_cast<const unsigned*>(&v);
        }
        o[c] = make_uint4(ow[0], ow[1], ow[2], ow[3]);
    }
}

// Round to nearest even, as PyTorch's .to(torch.bfloat16) does.
extern "C" __global__ void f32_to_bf16(__nv_bfloat16* out, const float* in, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void bf16_to_f32(float* out, const __nv_bfloat16* in, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}

// out[i] = bf16(offset + scale * x), x = float32(splitmix64(key + i) >> 40) * 2^-23 - 1 in
// [-1, 1): bit-identical to nexusrt.reference.synthetic.synthetic_values (the CPU definition of
// synthetic weights) when key = seed * 0x9E3779B97F4A7C15 + tensor_index * 0xD1B54A32D192ED03.
// x is exact in fp32; offset + scale * x is a rounded multiply then a rounded add (no FMA),
// then round-to-nearest-even to bf16, as NumPy's float32 -> bfloat16 cast does.
extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* out, unsigned long long n,
                                             unsigned long long key, float scale, float offset) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float x = (float)(nrt::splitmix64(key + i) >> 40) * 0x1.0p-23f - 1.0f;
        out[i] = __float2bfloat16_rn(__fadd_rn(offset, __fmul_rn(scale, x)));
    }
}
