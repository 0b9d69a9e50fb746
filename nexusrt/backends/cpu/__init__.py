"""backends/cpu layer."""
