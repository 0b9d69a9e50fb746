"""The host half of the persistent decode kernel (issue 15): the instruction format, the lowering
of the decode stage chain into per-SM instruction lists with counters, and a NumPy interpreter
that runs a lowered program in a random interleaving to prove it right. No driver code here."""
