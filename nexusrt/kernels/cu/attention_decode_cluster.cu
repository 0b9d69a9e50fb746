// attention_decode_cluster: the one-sequence decode attention kernels (attention_decode.cu) in
// thread-block clusters of kClusterSize along the splits (sm_90; the module holds no kernel for
// older parts). A context of at most kClusterSize loop steps is split one step per block of the
// first cluster of its KV head, and the blocks combine through distributed shared memory (two
// cluster barriers) instead of the workspace, a fence and an atomic ticket; a longer context
// takes the plain kernel's workspace path (decode_attention.cuh, kCluster). A module of its own
// so the other kernels' machine code stays as it was.
//
// Same arguments as attention_decode_d<D>_g<G>; grid (Hkv, Y) with Y >= max_splits a multiple of
// kClusterSize, cluster dims (1, kClusterSize, 1). Blocks past a split's work exit at once.
#include "decode_attention.cuh"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define NRT_DECODE_CLUSTER(D, GM, EXACT, NAME)                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                    \
        const float* q, float* out, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,       \
        const int* page_table, const int* pos, float* ws_acc, float2* ws_ml, int* tickets, int Hkv, \
        int G, int max_splits, float scale) {                                                       \
        decode_impl<D, GM, EXACT, false, false, float, false, false, true>(                         \
            q, out, k_pool, v_pool, page_table, pos, ws_acc, ws_ml, tickets, Hkv, G, max_splits,    \
            scale, 0, 0, nullptr, nullptr);                                                         \
    }

NRT_DECODE_ALL_G(64, NRT_DECODE_CLUSTER, attention_decode_cluster)
NRT_DECODE_ALL_G(128, NRT_DECODE_CLUSTER, attention_decode_cluster)
#endif
