"""Erasure evaluation (protocols, H_o) and the prefix-token attack."""
