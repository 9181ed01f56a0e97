"""The LLaVA-1.5 projector: a 2-layer MLP from vision features to the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Linear -> GELU -> Linear, mapping (..., vision_dim) visual tokens to (..., hidden) LLM inputs."""

    def __init__(self, vision_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features.to(self.linear_1.weight.dtype))))

    @torch.no_grad()
    def match_norm(self, features: torch.Tensor, target_norm: float) -> None:
        """Rescale the output layer so projected tokens of `features` have mean norm `target_norm`.

        Called before stage-1 training with the norm of the LLM's token embeddings: the frozen LLM
        then sees visual tokens of a familiar magnitude from the first step instead of tokens tens
        of times too large or small, which otherwise costs many steps of the short training budget.
        """
        norm = self(features.reshape(-1, features.shape[-1])).float().norm(dim=-1).mean().clamp_min(1e-6)
        self.linear_2.weight.mul_(target_norm / norm)
        self.linear_2.bias.mul_(target_norm / norm)
