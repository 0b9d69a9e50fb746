"""The CUDA model runner: weights in the arena, our NVRTC kernels, the decode step as one CUDA graph."""
