"""The memory layer (being written): the arena, tensors, pinned buffers, copies, stats."""
