// attention_decode: one query token per sequence against the paged bf16 KV cache (GQA),
// split-KV ("flash-decoding") so a single token still spreads over the whole GPU.
//
// grid (Hkv, max_splits), block 128. Block (h, s) owns KV head h and the s-th chunk of the
// sequence, and serves all G = Hq / Hkv query heads of that group, so each K/V row is read
// from memory exactly once. seq_len = *pos + 1 is read on the device, so the chunking is
// decided here, not by the host: chunk = round_up(ceil(seq_len / max_splits), kTokIter),
// nsplit = ceil(seq_len / chunk); blocks with s >= nsplit exit at once (a captured graph
// keeps a fixed grid sized for max_context). With nsplit == 1 the block writes the output
// directly; otherwise each block writes its partial softmax state (m, l, acc) to the
// workspace and the last block of its KV head to finish (an atomic ticket) combines them
// and resets the ticket to 0 for the next launch, so no second kernel is needed.
//
// Inside a block the D/8 lanes of a "row group" read one K row (or V row) with 16-byte
// loads, 8 dims each; every row group keeps its own online-softmax state over the tokens
// it saw, and the states are merged (warp shuffles, then shared memory) at the end. The rows
// of the next step are loaded into a second register buffer before the current step's math,
// so two steps are in flight per block (at 32k context this took the 8B shape's layer from
// 75.7 to 59.7 us on an H200; BENCHMARKS.md).
#include "decode_attention.cuh"

// q fp32 [Hq*D], out fp32 [Hq*D]; ws_acc fp32 [Hkv][max_splits][G][D]; ws_ml float2
// [Hkv][max_splits][G]; tickets int32 [Hkv], zero before the first launch. G = Hq / Hkv:
// attention_decode_d<D>_g<G> for G in {1, 2, 4, 8}, else attention_decode_d<D>_gmax<4|8>.
// The rows kernels (attention_decode_rows_*): q fp32 [rows][Hq*D], out bf16 [rows][Hq*D],
// tables int32 [*][table_stride], meta int32 [rows][4], and every workspace with a leading
// [rows]; grid (Hkv, max_splits, rows).
// The scores twins of the rows kernels (h2o) are in attention_scores.cu, a module of their own.
// The host-tier twins (attention_decode_host_*) take the same arguments plus k_host, v_host
// (the layer's host-tier pools) at the end. There are no rows twins: the batched engine has
// no host tier (the one-sequence path only).
// The fault-ring twins (attention_decode_host_fault_*) take the host twins' arguments plus ring
// (int32 words, kvcache/fault_ring.py layout) and ring_capacity (its slots, a power of two).
// (The entry points: decode_attention.cuh, shared with attention_decode_mma.cu and
// attention_decode_cluster.cu.)
NRT_DECODE_SEQ_TWINS(attention_decode, CORE)
NRT_DECODE_ROWS_TWINS(attention_decode, CORE)
NRT_DECODE_HOST_TWINS(attention_decode, CORE)
