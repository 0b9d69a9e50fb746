// The persistent kernel's weight ring (issue 15 item 2; NOTES_persistent.md, "The weight ring").
//
// Every GEMV tile's weight rows reach shared memory through the bulk-copy engine instead of
// 16-byte loads into registers. The SM's instruction list fixes, before the step starts, the
// order in which its tiles will read weight bytes: tile after tile, each weight row cut into
// pages of kPageBytes (whole steps of row_dot's loop; the last page of a row may be short), a
// tile's pages in the order its warps read them side by side (tile_page). The host numbers them per SM
// (kernels/ops/persistent.py ring_page_starts, in the pad word of each program row), and page q
// lives in slot q % n of a ring of n pages.
//
// Thread 0 issues the first n pages when the step starts. From then on each page has exactly
// one reader, the warp that owns its row, and that warp's lane 0 hands the slot on to page
// q + n as soon as the warp has read page q. Weights depend on no counter, so the copies run
// ahead of the instruction the CTA is in: while it waits for another SM's counter at a stage
// boundary, the next tiles' weights are already in flight. A reader may reach page q + n before
// page q is read (another warp's row), so each slot also counts the copies it was given
// (fills), and a reader waits for its copy to be issued before it waits for it to land: a
// barrier's parity alone cannot tell that copy from the one before it. No deadlock: the lowest
// unread page has been issued (the page n before it was read, and its reader issued it), and
// its reader, which reads its pages in increasing order, waits for nothing else; every page of
// a tile is read before the tile's closing barrier, so the CTA's barriers never wait on a page
// that needs a later tile. A wait that still never ends records itself and traps.
//
// With a loader warpgroup (the _loader entries, NEXUSRT_PERSISTENT_RING=loader) the readers do
// not issue copies: a reader done with page q arrives on its slot's `empty` barrier, and the
// loader warp, which issues every page in order, waits for that before issuing page q + n
// (persistent_decode.cuh ring_load). Everything else above holds unchanged.
//
// Each row's sum is row_dot's (lane l adds chunks l, l + 32, ... in order, then warp_sum), so
// the logits keep the bits of the kernel's 16-byte-load path and the graph path's GEMV order.
#pragma once

#include "bulk_copy.cuh"
#include "persistent_tiles.cuh"

#ifdef NRT_HAS_BULK_COPY
namespace nrt_pk {

#ifndef NRT_RING_PAGE_BYTES
#define NRT_RING_PAGE_BYTES 4096
#endif
constexpr int kPageBytes = NRT_RING_PAGE_BYTES;  // kernels/ops/persistent.py RING_PAGE_BYTES
constexpr int kPageChunks = kPageBytes / 16;
constexpr int kStepChunks = 32 * kU;  // one step of row_dot's loop
static_assert(kPageChunks % kStepChunks == 0, "a page is whole steps of row_dot's loop");
constexpr int kMaxPages = 64;  // kernels/ops/persistent.py MAX_RING_PAGES

struct WeightRing {
    uint4* pages;              // n slots of kPageBytes in dynamic shared memory
    unsigned long long* full;  // one transaction barrier per slot
    volatile int* fills;       // copies issued into each slot this step (page q is copy q / n of slot q % n)
    unsigned long long* empty; // with a loader warpgroup: one barrier per slot, phase k ends when its copy k is read
    int n;                     // slots
    int total;                 // pages this SM streams in a step
    int* debug;                // the kernel's debug words
};

__device__ __forceinline__ int pages_per_row(int K) { return (2 * K + kPageBytes - 1) / kPageBytes; }

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// One thread: `bytes` from src into `slot` as its copy number `fill` (0-based), completing on the
// slot's barrier (a page straddling two of the arena's 2 MiB mappings is copied in two parts,
// bulk_copy.cuh bulk_load_mapped). No fence before the fill count: a reader that sees it waits for
// the phase of this copy, which the copy before it (already landed: its page was read) has
// opened, and which cannot end before this arrival and these bytes.
__device__ __forceinline__ void ring_fill(const WeightRing& r, int slot, int fill, const char* src, unsigned bytes) {
    nrt::mbar_arrive_expect_tx(r.full + slot, bytes);
    nrt::bulk_load_mapped(r.pages + (size_t)slot * kPageChunks, src, bytes, r.full + slot);
    r.fills[slot] = fill + 1;
}

// Until copy `fill` of `slot` (page q) has been issued and has landed.
__device__ __forceinline__ void ring_wait(const WeightRing& r, int slot, int fill, int q) {
    for (unsigned long long since = 0;;) {
        if (r.fills[slot] > fill && nrt::mbar_try_wait(r.full + slot, (unsigned)fill & 1u)) return;
        if (wait_expired(since)) fail(r.debug, blockIdx.x + 1, q, -3, slot, fill);
    }
}

// The loader: until the page before copy `fill` (page q) in `slot`, page q - n, has been read.
// A parity wait is exact here: copy fill - 1 was issued only after copy fill - 2 had been read.
__device__ __forceinline__ void ring_wait_read(const WeightRing& r, int slot, int fill, int q) {
    for (unsigned long long since = 0;;) {
        if (nrt::mbar_try_wait(r.empty + slot, (unsigned)(fill - 1) & 1u)) return;
        if (wait_expired(since)) fail(r.debug, blockIdx.x + 1, q, -4, slot, fill);
    }
}

// row_dot over a row whose pages are q, q + stride, q + 2 stride, ...; after each page the
// warp's lane 0 calls refill(q + n, slot, fill + 1) when the step has that page (which issues it
// into the slot just read, or with a loader says the slot is free).
template <class Refill>
__device__ __forceinline__ float ring_row_dot(const WeightRing& r, int q, int stride, const float* xs, int nch,
                                              int lane, Refill& refill) {
    const float4* x4 = reinterpret_cast<const float4*>(xs);
    int slot = q % r.n, fill = q / r.n;
    float acc = 0.0f;
    for (int c0 = 0; c0 < nch; c0 += kPageChunks, q += stride) {
        ring_wait(r, slot, fill, q);
        const uint4* page = r.pages + (size_t)slot * kPageChunks;
        for (int s0 = 0; s0 < kPageChunks && c0 + s0 < nch; s0 += kStepChunks) {
            uint4 w[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const int c = c0 + s0 + u * 32 + lane;
                if (c < nch) w[u] = page[s0 + u * 32 + lane];
            }
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const int c = c0 + s0 + u * 32 + lane;
                if (c < nch) acc += nrt::dot8(w[u], x4[c], x4[nch + c]);
            }
        }
        __syncwarp();  // every lane has read the slot (its values are in the sum)
        if (lane == 0 && q + r.n < r.total) {
            nrt::fence_proxy_async();  // those generic reads before the copy's async write
            refill(q + r.n, slot, fill + 1);
        }
        for (slot += stride; slot >= r.n; slot -= r.n) ++fill;  // one pass unless the ring is under kWarps pages
    }
    return nrt::warp_sum(acc);
}

// Where page t of a GEMV tile lives (the order the host counts and the cursor issues): the tile's
// V outputs are taken kWarps at a time (a group: the rows the warps read side by side), and a
// group's pages go piece by piece, each piece of every row of the group before the next piece,
// so the pages are read about in the order they were issued. An output's pieces are its weight
// row's (gate/up: the gate row's, then the up row's): vp of them. Returns the output v and the
// piece p of t.
__device__ __forceinline__ void tile_page(int t, int V, int vp, int& v, int& p) {
    // No divisions where they can be avoided (this runs once a page): a tile has few groups, and
    // all but the last one have kWarps rows.
    const int span = kWarps * vp;
    int g = 0, rest = t;
    while (rest >= span) rest -= span, ++g;
    const int rows = min(kWarps, V - g * kWarps);
    p = rows == kWarps ? rest / kWarps : rest / rows;
    v = g * kWarps + (rest - p * rows);
}

// gemv_tile with its weights from the ring: outputs [a, b), the tile's first page q0. Warp w
// takes outputs a + w, a + w + kWarps, ... one at a time (gate/up: the gate row, then its up
// row), each row's pieces kWarps pages apart (tile_page), so every warp reads its pages in
// increasing order.
template <class Refill>
__device__ __forceinline__ void gemv_tile_ring(float* y, const float* xs, const float* bias, int kind, int a, int b,
                                               int K, const WeightRing& r, int q0, Refill& refill) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nch = K / 8, ppr = pages_per_row(K);
    const int V = b - a, vp = (kind == kGateUp ? 2 : 1) * ppr;
    for (int v = warp; v < V; v += kWarps) {
        const int g = v / kWarps, rows = min(kWarps, V - g * kWarps);
        const int q = q0 + g * kWarps * vp + (v - g * kWarps);
        float s = ring_row_dot(r, q, rows, xs, nch, lane, refill);
        if (kind == kGateUp) s = nrt::silu(s) * ring_row_dot(r, q + ppr * rows, rows, xs, nch, lane, refill);
        if (lane == 0) {
            if (kind == kGateUp) y[a + v] = s;
            else gemv_store(y, bias, kind, a + v, s);
        }
    }
}

}  // namespace nrt_pk
#endif  // NRT_HAS_BULK_COPY
