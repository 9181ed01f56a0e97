"""Similarity measures between hidden states used to find redundant depth.

- block influence (ShortGPT): 1 - cosine(block input, block output), averaged over tokens;
- angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
  arccos(cosine(h_l, h_{l+n})) / pi, averaged over tokens;
- linear CKA (Kornblith et al.) between two layers' token representations.
All are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token of two (..., dim) tensors, flattened to one vector."""
    return F.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]), dim=-1)


def block_influence(block_input: torch.Tensor, block_output: torch.Tensor) -> float:
    return float(1 - token_cosine(block_input, block_output).mean())


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = token_cosine(a, b).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / torch.pi).mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (tokens, dim) matrices, in the feature-space form (no n x n Gram matrix)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_matrix(states: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise linear CKA between every pair of layers' (tokens, dim) states."""
    n = len(states)
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = linear_cka(states[i], states[j])
    return out
