"""Building blocks shared by the depth-compression methods.

What every block-removal or merging baseline needs besides the block runner
(`depthkit.models.runner`: the block states on calibration tokens, re-running only the blocks
after an edit, in memory or streamed from disk): the calibration loss of a model, a way to cut
blocks out so the checkpoint stays a plain Hugging Face model, parameter counts, and the options
of the methods that search by re-running candidates (SLEB, LaCo, FlattenGPT).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from depthkit.compress.base import MethodOptions, option
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.runner import BlockStates, InMemoryModel, head_loss


def num_blocks(model: PreTrainedModel) -> int:
    return len(get_adapter(model).layers(model))


def ranking_steps(scores: Sequence[float]) -> list[dict[str, Any]]:
    """The steps of a one-shot ranking plan: every block, lowest score first (ties: the earlier
    block), so that the first k steps are the k blocks a one-shot selection of k drops."""
    return [{"block": i, "score": scores[i]} for i in sorted(range(len(scores)), key=scores.__getitem__)]


def ranked_blocks(plan: CompressionPlan, count: int) -> list[int]:
    """The first `count` blocks of a ranking plan, sorted by position."""
    return sorted(step["block"] for step in plan.steps[:count])


def scores_by_block(plan: CompressionPlan) -> list[float]:
    """The scores of a ranking plan in block order (as the card lists them)."""
    return [step["score"] for step in sorted(plan.steps, key=lambda step: step["block"])]


def remove_blocks(model: PreTrainedModel, indices: Iterable[int]) -> list[int]:
    """Delete the blocks at `indices` (current positions); the config follows. Returns them sorted."""
    adapter = get_adapter(model)
    layers = list(adapter.layers(model))
    drop = sorted(set(indices))
    require(all(0 <= i < len(layers) for i in drop), f"block indices {drop} out of range 0..{len(layers) - 1}")
    require(len(drop) < len(layers), f"removing {len(drop)} of {len(layers)} blocks would leave none")
    adapter.set_layers(model, [layer for i, layer in enumerate(layers) if i not in drop])
    return drop


@torch.no_grad()
def capture_states(model: PreTrainedModel, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """`states[i]` is the input of block i on `ids`; `states[-1]` is the last block's output."""
    return BlockStates(InMemoryModel(model), ids, batch_size).states


@torch.no_grad()
def lm_loss(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of `ids` given the last block's output `hidden`."""
    return head_loss(InMemoryModel(model).head, hidden, ids, batch_size)


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Stored parameters, and `effective` ones: those in tensors that are not entirely zero.

    The two differ only when a method zeroes whole weight matrices instead of removing them
    (attention-only drop), which saves nothing in a plain checkpoint: the card shows both.
    """
    total = effective = 0
    for param in model.parameters():
        total += param.numel()
        if bool(param.detach().any()):
            effective += param.numel()
    return {"total": total, "effective": effective}


@dataclass
class SearchOptions(MethodOptions):
    """Options of the methods that search by re-running candidates on a few calibration sequences."""

    selection_blocks: int = option(8, "calibration sequences used by the search (default 8; the first ones)")

    def validate(self) -> None:
        super().validate()
        require(self.selection_blocks >= 1, f"selection_blocks must be >= 1, got {self.selection_blocks}")


def selection_subset(calib_ids: torch.Tensor, max_sequences: int | None) -> torch.Tensor:
    """The first `max_sequences` calibration sequences: searches that re-run many candidates use few."""
    require(max_sequences is None or max_sequences >= 1, f"need at least 1 selection sequence, got {max_sequences}")
    return calib_ids if max_sequences is None else calib_ids[:max_sequences]
