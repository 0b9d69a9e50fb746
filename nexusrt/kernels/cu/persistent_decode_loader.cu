// The persistent decode kernel's warp-specialised entry points (NEXUSRT_PERSISTENT_RING=loader;
// the kernel: persistent_decode.cuh, which this unit includes before anything else). A module of
// their own: they double the kernel's compile time, and only the opt-in loader ring uses them.
#include "persistent_decode.cuh"

// persistent_decode_loader_d<D>_g<GM> (sm_90; elsewhere this module has no entries): the
// entries of persistent_decode.cu with a loader warpgroup, 384 threads a block, for a launch with
// a weight ring. params, grid and shared memory as there.
#ifdef NRT_HAS_BULK_COPY
#define NRT_PERSISTENT_LOADER(D, GM)                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads + kLoaderThreads, 1)                     \
        persistent_decode_loader_d##D##_g##GM(const unsigned long long* params) {                  \
        run<D, GM, true>(params);                                                                  \
    }

NRT_PERSISTENT_SHAPES(NRT_PERSISTENT_LOADER)
#endif
