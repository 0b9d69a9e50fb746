// attention_decode_mma: the one-sequence decode attention kernels (attention_decode.cu) with each
// split's tokens read and multiplied by decode_attention_mma.cuh: every warp streams its own 16-token
// pages of K and V into a ring in shared memory with cp.async (several pages in flight), and q.K^T
// and P.V run on mma.sync (bf16 hi + lo halves of q and P, fp32 accumulate). The split plan, the
// merge across warps and the combine across splits are the plain kernels' (decode_attention.cuh,
// kMma), with a loop step of kWarps pages (64 tokens). No h2o scores. A module of its own so the
// other kernels' machine code stays as it was.
//
// Same arguments as attention_decode_d<D>_g<G> (attention_decode_mma_rows_*: as
// attention_decode_rows_*, grid (Hkv, max_splits, rows); attention_decode_mma_host_* and
// attention_decode_mma_host_fault_*: as the host-tier twins attention_decode_host_*, a block copied
// from the host pools by the same cp.async, so its result does not depend on the tier);
// grid (Hkv, max_splits), block 128,
// dynamic shared memory nrt_decode_mma::ring_bytes<D, 4>() (64 KiB at D = 64, 96 KiB at D = 128).
#include "decode_attention.cuh"

// (The entry points: decode_attention.cuh, shared with attention_decode.cu.)
NRT_DECODE_SEQ_TWINS(attention_decode_mma, MMA)
NRT_DECODE_ROWS_TWINS(attention_decode_mma, MMA)
NRT_DECODE_HOST_TWINS(attention_decode_mma, MMA)
