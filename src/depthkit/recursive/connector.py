"""The Recursive Connector: how one step's intermediate features become the next step's input.

Feeding the last hidden state straight back (vanilla recursion) hands the first layer a vector
whose norm and distribution are far from the embeddings it was trained on. The connector reads
k intermediate layers instead, normalises each with RMSNorm, projects it with a module specific
to the layer AND the token's modality (a token-type mask selects it: text-only models have one
modality, a vision-language model adds more), fuses the k results and adds them, times a
learnable per-modality scale, onto the original embeddings (or the previous step's input).
The scale starts at 0, so step 2 starts exactly as a second pretrained single pass.

The size of the update must match what it is added onto. With unit gains each normalised tap has
RMS 1 per dimension, 20-30x a typical input embedding, so any non-zero scale swamps the embeddings,
the scale takes almost all of the gradient and training switches the connector off (measured: scale
0.01 -> 0.0002 on SmolLM2). Two ways to size it (`connector_norm`):
- "embeddings" (the first default, kept for saved configs): the norms' gains start at the input
  embeddings' RMS / k, so scale 1 means "an update the size of an embedding". Right when the residual
  IS the embeddings; wrong when the loop starts after a prelude: SmolLM2's hidden states after its
  first layer have RMS ~1.9 against 0.14 for the embeddings, so the update was 14x smaller than
  meant, scale 0.1 moved the next step's input by under 1%, and the loop added nothing (steps 1 -> 4
  gained 0.1% of held-out perplexity; measured in benchmarks/recursion.py).
- "residual": every token's update is multiplied by the RMS of the residual it is added onto (not a
  trained path: the RMS is detached), with gains starting at 1 / k, so scale s means "an update s
  times the residual" whatever layer the residual comes from and however much it grows over steps.
"""

from __future__ import annotations

import torch
from torch import nn

from depthkit.errors import require
from depthkit.recursive.config import RecursiveConfig


class ConnectorRMSNorm(nn.Module):
    """RMSNorm with a learnable gain (kept here so the connector works for any base architecture)."""

    def __init__(self, hidden: int, eps: float = 1e-6, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden,), float(gain)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_projection(kind: str, hidden: int) -> nn.Module:
    """Linear (initialised to the identity: the normalised feature itself) or a 2-layer MLP."""
    if kind == "linear":
        linear = nn.Linear(hidden, hidden, bias=False)
        nn.init.eye_(linear.weight)
        return linear
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class RecursiveConnector(nn.Module):
    """RMSNorm + projection per (sampled layer, modality), fused, scaled, added onto a residual."""

    def __init__(self, config: RecursiveConfig, hidden: int, eps: float = 1e-6, embedding_rms: float = 1.0):
        super().__init__()
        self.positions = config.connector_positions()
        self.num_modalities = config.num_modalities
        self.fuse = config.fuse
        count = len(self.positions) * config.num_modalities
        self.relative = config.connector_norm == "residual"
        gain = config.connector_gain or (1.0 if self.relative else embedding_rms) / len(self.positions)
        self.norms = nn.ModuleList(ConnectorRMSNorm(hidden, eps, gain) for _ in range(count))
        self.projections = nn.ModuleList(make_projection(config.projection, hidden) for _ in range(count))
        self.fuse_logits = nn.Parameter(torch.zeros(len(self.positions))) if config.fuse == "weighted" else None
        self.scale = nn.Parameter(torch.full((config.num_modalities,), float(config.scale_init)))

    def _index(self, tap: int, modality: int) -> int:
        return tap * self.num_modalities + modality

    def fused(self, taps: list[torch.Tensor], modality_ids: torch.Tensor | None) -> torch.Tensor:
        """Sum (or softmax-weighted sum) over sampled layers of their modality-specific projections."""
        require(len(taps) == len(self.positions), f"connector expects {len(self.positions)} features, got {len(taps)}")
        weights = torch.softmax(self.fuse_logits, 0) if self.fuse_logits is not None else None
        total = None
        for tap_index, feature in enumerate(taps):
            projected = self._project(tap_index, feature, modality_ids)
            if weights is not None:
                projected = projected * weights[tap_index].to(projected.dtype)
            total = projected if total is None else total + projected
        return total

    def _project(self, tap: int, feature: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        feature = feature.to(self.scale.dtype)  # the connector may be float32 on a bfloat16 base
        if self.num_modalities == 1:
            index = self._index(tap, 0)
            return self.projections[index](self.norms[index](feature))
        out = torch.zeros_like(feature)
        for modality in range(self.num_modalities):
            mask = (modality_ids == modality).unsqueeze(-1)
            index = self._index(tap, modality)
            out = torch.where(mask, self.projections[index](self.norms[index](feature)).to(out.dtype), out)
        return out

    def forward(self, taps: list[torch.Tensor], residual: torch.Tensor,
                modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next step's input: `residual` (the tensor `config.residual` names, chosen by the model)
        + scale[modality] * fused."""
        if self.num_modalities > 1:
            require(modality_ids is not None, "this recursive model has several modalities: pass modality_ids "
                                              "(the token-type mask) with the input")
            require(int(modality_ids.min()) >= 0 and int(modality_ids.max()) < self.num_modalities,
                    f"modality_ids must lie in 0..{self.num_modalities - 1}")
        fused = self.fused(taps, modality_ids)
        if self.relative:
            fused = fused * residual.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
        scale = self.scale[0] if self.num_modalities == 1 else self.scale[modality_ids].unsqueeze(-1)
        return residual + (scale * fused).to(residual.dtype)
