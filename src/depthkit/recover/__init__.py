"""Recovery fine-tuning of compressed models: LoRA on every block, optional distillation from the
original model, driven by `accelerate` (one CPU, one GPU or several), merged back into a plain
Hugging Face checkpoint."""

from depthkit.recover.lora import attach_lora, merged_state_dict, save_merged
from depthkit.recover.losses import causal_lm_loss, distillation_loss, recovery_loss
from depthkit.recover.trainer import CARD_FILE, RecoverySettings, recover, training_blocks

__all__ = [
    "CARD_FILE",
    "RecoverySettings",
    "attach_lora",
    "causal_lm_loss",
    "distillation_loss",
    "merged_state_dict",
    "save_merged",
    "recover",
    "recovery_loss",
    "training_blocks",
]
