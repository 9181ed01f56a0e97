"""Training objectives for recovery: next-token cross-entropy, optionally mixed with
distillation from the uncompressed model (KL between temperature-softened distributions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of logits (batch, seq, vocab) on their own inputs."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher || student) of the softened distributions, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.), so
    the mixing weight with cross-entropy means the same thing whatever the temperature.
    """
    vocab = student.shape[-1]
    student_log = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean") * temperature**2


def recovery_loss(logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                  distill_weight: float = 0.0, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """`(1 - w) * CE + w * KL`; returns the total under "loss" and its parts for logging."""
    ce = causal_lm_loss(logits, input_ids)
    if teacher_logits is None or distill_weight == 0:
        return {"loss": ce, "ce": ce}
    kl = distillation_loss(logits, teacher_logits, temperature)
    return {"loss": (1 - distill_weight) * ce + distill_weight * kl, "ce": ce, "kl": kl}
