"""Weight edits: the task-vector split into general and memory streams (with PEFT LoRA export), and
targeted orthogonal ablation (difference-of-means directions projected out of the residual writers)."""

from libortho.edit.ablate import (
    WRITERS,
    apply_weight_edit,
    behaviour_stream_for,
    project_out,
    project_out_rows,
    select_layer_direction,
    writer_sites,
)
from libortho.edit.directions import Directions, aggregate_direction, difference_of_means, find_directions
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

__all__ = ["REST_CHOICES", "WRITERS", "Directions", "SplitLayer", "TaskVectorSplit", "aggregate_direction",
           "apply_split", "apply_weight_edit", "behaviour_stream_for", "difference_of_means", "export_lora",
           "find_directions", "project_out", "project_out_rows", "select_layer_direction", "split_matrix",
           "split_model", "tau_norms", "writer_sites"]
