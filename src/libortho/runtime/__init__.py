"""Runtime: OrthoLinear (base + alpha * memory) and MemoryNeurons inside ordinary Hugging Face models."""

from libortho.runtime.linear import LOCKED_MESSAGE, OrthoLinear
from libortho.runtime.memory_mlp import MemoryNeurons, attach_neurons, neuron_sites, remove_neurons
from libortho.runtime.patch import (
    alpha_scope,
    attach_memory,
    get_alpha,
    group_shared_inputs,
    kernel_report,
    log_kernel_fallbacks,
    ortho_layers,
    replace_module,
    set_alpha,
    switchable_layers,
)

__all__ = ["LOCKED_MESSAGE", "MemoryNeurons", "OrthoLinear", "alpha_scope", "attach_memory", "attach_neurons",
           "get_alpha", "group_shared_inputs", "kernel_report", "log_kernel_fallbacks", "neuron_sites",
           "ortho_layers", "remove_neurons", "replace_module", "set_alpha", "switchable_layers"]
