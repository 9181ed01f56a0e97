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


def token_cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cosine similarity per token of two (..., dim) tensors, flattened to one vector.

    Computed in float32 `chunk` tokens at a time: float copies of all calibration activations
    would cost several times the bf16 activations themselves.
    """
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return torch.cat([F.cosine_similarity(a[i : i + chunk].float(), b[i : i + chunk].float(), dim=-1)
                      for i in range(0, a.shape[0], chunk)])


def relative_error(output: torch.Tensor, target: torch.Tensor, source: torch.Tensor, chunk: int = 4096) -> float:
    """Squared error of `output` against `target`, relative to the update `target - source`.

    Accumulated in float32 `chunk` tokens at a time, for the same reason as `token_cosine`."""
    output, target, source = (t.reshape(-1, t.shape[-1]) for t in (output, target, source))
    error = update = 0.0
    for i in range(0, output.shape[0], chunk):
        goal = target[i : i + chunk].float()
        error += float((output[i : i + chunk].float() - goal).pow(2).sum())
        update += float((goal - source[i : i + chunk].float()).pow(2).sum())
    return error / max(update, 1e-30)


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
