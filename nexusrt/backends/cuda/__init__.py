"""backends/cuda layer."""
