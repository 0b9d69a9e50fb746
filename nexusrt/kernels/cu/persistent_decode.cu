// The persistent decode kernel's entry points with 256 threads a block (the kernel:
// persistent_decode.cuh, which this unit includes before anything else). The warp-specialised
// entries are a module of their own, persistent_decode_loader.cu.
#include "persistent_decode.cuh"

// persistent_decode_d<D>_g<GM>: head_dim D, up to GM query heads per KV head (the launcher
// picks the smallest GM >= G). params: u64 [kNumSlots]. grid = SM count, block 256, one CTA
// per SM, dynamic shared memory max(4 * max(H, I, Hq * D), sizeof(PoolShared)) bytes, then the
// SM's instruction list.
#define NRT_PERSISTENT(D, GM)                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                      \
        persistent_decode_d##D##_g##GM(const unsigned long long* params) {                         \
        run<D, GM, false>(params);                                                                 \
    }

NRT_PERSISTENT_SHAPES(NRT_PERSISTENT)
