"""Storage formats of the streams (no nn.Module here): the packed base and the memory forms."""

from libortho.streams.base import BaseStream, expand_groups, num_groups
from libortho.streams.memory import (
    SITES,
    STREAM_FORMS,
    LowRankMemory,
    MemoryStream,
    NeuronMemory,
    memory_params,
    stream_from_tensors,
)
from libortho.streams.ortho import DTYPES, SparseOrtho

__all__ = ["DTYPES", "SITES", "STREAM_FORMS", "BaseStream", "LowRankMemory", "MemoryStream", "NeuronMemory",
           "SparseOrtho", "expand_groups", "memory_params", "num_groups", "stream_from_tensors"]
