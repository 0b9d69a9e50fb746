"""Counter-based random numbers shared by synthetic weights and token sampling.

Both the NumPy backend and the CUDA kernels must produce bit-identical values, so the
generator is a pure function of integers (no state): **splitmix64**, as published by
Steele, Lea and Flood (2014) and used by Java's ``SplittableRandom``. All arithmetic is
on unsigned 64-bit integers, wrapping mod 2**64::

    splitmix64(x):
        z = x + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

In CUDA this is three ``unsigned long long`` lines; numpy's ``uint64`` arrays wrap the
same way, which is what :func:`splitmix64_array` relies on.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # golden-ratio increment of splitmix64
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def splitmix64(x: int) -> int:
    """splitmix64 of one integer (taken mod 2**64); returns an int in [0, 2**64)."""
    z = (x + GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a ``uint64`` array (a new ``uint64`` array)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(GAMMA)
    with np.errstate(over="ignore"):  # wrapping multiply is the algorithm, not an accident
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)
    return z ^ (z >> np.uint64(31))
