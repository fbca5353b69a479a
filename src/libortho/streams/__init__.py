"""Storage formats of the two streams (no nn.Module here)."""

from libortho.streams.base import BaseStream, expand_groups, num_groups
from libortho.streams.ortho import SparseOrtho

__all__ = ["BaseStream", "SparseOrtho", "expand_groups", "num_groups"]
