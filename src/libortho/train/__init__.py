"""Training: the fine-tuning loop (resumable, deterministic) and the unlearning baselines registry."""

from libortho.train.loop import TrainConfig, TrainLog, load_checkpoint, save_checkpoint, train
from libortho.train.unlearn import UNLEARNING, UnlearnConfig, UnlearnTask, register_unlearning, run_unlearning

__all__ = ["UNLEARNING", "TrainConfig", "TrainLog", "UnlearnConfig", "UnlearnTask", "load_checkpoint",
           "register_unlearning", "run_unlearning", "save_checkpoint", "train"]
