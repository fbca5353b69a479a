"""Weight edits: the task-vector split into general and memory streams, with PEFT LoRA export."""

from libortho.edit.task_vector import (
    REST_CHOICES,
    SplitLayer,
    TaskVectorSplit,
    apply_split,
    export_lora,
    split_matrix,
    split_model,
    tau_norms,
)

__all__ = ["REST_CHOICES", "SplitLayer", "TaskVectorSplit", "apply_split", "export_lora", "split_matrix",
           "split_model", "tau_norms"]
