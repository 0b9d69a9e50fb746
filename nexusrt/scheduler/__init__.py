"""The scheduler layer (being written)."""
