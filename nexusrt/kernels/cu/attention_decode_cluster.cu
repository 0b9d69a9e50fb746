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
NRT_DECODE_SEQ_TWINS(attention_decode_cluster, CLUSTER)  // entry points: decode_attention.cuh
#endif
