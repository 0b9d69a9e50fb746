// Programmatic dependent launch (sm_90+). A kernel launched with the
// PROGRAMMATIC_STREAM_SERIALIZATION attribute may start while the kernel before it on the
// stream is still running; it must call pdl_wait() before touching any memory that earlier
// kernels write or read (activations, the step state, workspaces). Only immutable data
// (weights) may be read before it. pdl_trigger() lets the NEXT kernel start early; we call it
// only after our own wait, so a kernel that starts early knows every kernel before its
// predecessor has completed. Without the attribute both are no-ops.
#pragma once

namespace nrt {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Wait for the previous kernel, then let the next one start.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_trigger();
}

}  // namespace nrt
