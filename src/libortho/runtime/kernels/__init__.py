"""Compute kernels for the base and ortho streams (CPU now; a Triton GPU path is planned)."""
