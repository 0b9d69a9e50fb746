"""The oracle: pure NumPy meaning of every op, the sampling algorithm and synthetic weights.

The bottom of the stack (it imports nothing of NexusRT but :mod:`nexusrt.errors`): the CPU
backend runs these functions, and the kernel tests compare the CUDA kernels with them. A
new kernel's NumPy meaning goes here, beside the ones it is checked against.
"""
