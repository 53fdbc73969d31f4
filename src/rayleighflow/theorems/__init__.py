"""Paper results as certificates: one module per theorem (THEORY.md §6)."""
