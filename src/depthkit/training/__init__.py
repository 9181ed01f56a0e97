"""The training core shared by recovery (`depthkit.recover`), recursive LMs (`depthkit.recursive.train`)
and the VLM (`depthkit.vlm.train`): one warm-up + cosine schedule, gradient clipping, the optimizer
step under accelerate, and resumable, rotated checkpoints in a folder that belongs to one run."""

from depthkit.training.checkpoints import check_new_run, checkpoints_beside, remove_checkpoints
from depthkit.training.core import Progress, Trainer, TrainingSettings, cycled, due, warmup_cosine

__all__ = [
    "Progress",
    "Trainer",
    "TrainingSettings",
    "check_new_run",
    "checkpoints_beside",
    "cycled",
    "due",
    "remove_checkpoints",
    "warmup_cosine",
]
