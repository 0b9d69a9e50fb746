// The fault ring's producer rule (kvcache/fault_ring.py is the specification and its NumPy
// model): a kernel about to read host-tier block h zero-copy asks the host drain to move h into
// a free device block for later reads. Posting is a hint, never a wait: a full ring counts an
// overflow and the read goes on zero-copy (the drain runs on another stream; a kernel spinning
// on it could hold the SMs that stream needs, so waiting could hang).
//
// Ring words (int32, device memory): head at 0, tail at 32, overflow at 64, bell at 96 (one
// 128-byte line each, so producers' atomics and the drain's stores never share a line),
// entries[capacity] from 128, then requested[host_blocks] (1 while h is posted and not yet
// serviced). The bell is the doorbell the drain's watch stream waits on (cuStreamWaitValue32).
#pragma once

#include <cuda/std/climits>

namespace nrt_fault {

constexpr int kLineWords = 32;
constexpr int kHead = 0, kTail = kLineWords, kOverflow = 2 * kLineWords, kBell = 3 * kLineWords,
              kEntries = 4 * kLineWords;
constexpr int kEmpty = INT_MIN;  // a free entry slot; host block ids are >= 0

// Post host block h to the ring of `capacity` slots (a power of two) at `ring`.
__device__ __forceinline__ void post(int* ring, int capacity, int h) {
    int* requested = ring + kEntries + capacity;
    // 1. One post per block in flight: whoever flips requested[h] 0 -> 1 owns the post.
    if (atomicCAS(requested + h, 0, 1) != 0) return;
    unsigned* head = reinterpret_cast<unsigned*>(ring + kHead);
    const volatile unsigned* tail = reinterpret_cast<const volatile unsigned*>(ring + kTail);
    for (;;) {
        // 2. Tail before head: a tail that moves on in between only makes the ring look
        // fuller than it is (a spurious overflow), never emptier (an overwritten entry).
        const unsigned t = *tail;
        const unsigned hd = *reinterpret_cast<volatile unsigned*>(head);
        if (hd - t >= static_cast<unsigned>(capacity)) {  // full: back-pressure, no wait
            atomicAdd(ring + kOverflow, 1);
            *reinterpret_cast<volatile int*>(requested + h) = 0;  // a later read may post again
            return;
        }
        if (atomicCAS(head, hd, hd + 1) == hd) {
            // 3. Publish the id after the claim; the drain stops at a claimed slot still EMPTY.
            __threadfence();
            reinterpret_cast<volatile int*>(ring + kEntries)[hd & (capacity - 1)] = h;
            // 4. Ring the doorbell. The watch stream's copy engine reads the entries once it
            // sees the bell, so the id must be visible beyond the SMs first: a system fence.
            // A store of 1, not a count: the watch clears the word before it copies, so a
            // store racing the clear still has its id in that copy.
            __threadfence_system();
            *reinterpret_cast<volatile int*>(ring + kBell) = 1;
            return;
        }
    }
}

// Post every host block among the table entries of pages first_page .. last_page, the threads
// of a block striding over them (a page shared with a neighbouring split is deduplicated by
// requested[h]).
__device__ __forceinline__ void post_host_pages(const int* __restrict__ page_table, int first_page, int last_page,
                                                int* ring, int capacity, int tid, int nthreads) {
    for (int p = first_page + tid; p <= last_page; p += nthreads) {
        const int b = page_table[p];
        if (b < 0) post(ring, capacity, ~b);
    }
}

}  // namespace nrt_fault
