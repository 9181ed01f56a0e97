"""Building blocks shared by the depth-compression methods.

Every block-removal or merging baseline needs the same few things: the hidden states entering each
block on calibration tokens (captured once, block by block), a way to re-run only the blocks after
an edit, the calibration loss or final representation of a candidate model, and a way to cut
blocks out so the checkpoint stays a plain Hugging Face model. Keeping them here means a search
(SLEB, LaCo) never re-runs the unchanged prefix of the model and never duplicates this code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.compress.base import MethodOptions, option
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import BlockContext, block_context, embed, logits_from_hidden, run_block


def num_blocks(model: PreTrainedModel) -> int:
    return len(get_adapter(model).layers(model))


def lowest(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k smallest scores, sorted by position (one-shot selection of what to drop)."""
    return sorted(sorted(range(len(scores)), key=scores.__getitem__)[:k])


def remove_blocks(model: PreTrainedModel, indices: Iterable[int]) -> list[int]:
    """Delete the blocks at `indices` (current positions); the config follows. Returns them sorted."""
    adapter = get_adapter(model)
    layers = list(adapter.layers(model))
    drop = sorted(set(indices))
    require(all(0 <= i < len(layers) for i in drop), f"block indices {drop} out of range 0..{len(layers) - 1}")
    require(len(drop) < len(layers), f"removing {len(drop)} of {len(layers)} blocks would leave none")
    adapter.set_layers(model, [layer for i, layer in enumerate(layers) if i not in drop])
    return drop


def calibration_context(model: PreTrainedModel, ids: torch.Tensor, batch_size: int) -> BlockContext:
    """Rotary embeddings and masks for one batch of calibration sequences (shared by every block)."""
    return block_context(model, embed(model, ids[:batch_size]))


@torch.no_grad()
def run_layers(
    model: PreTrainedModel,
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    batch_size: int = 8,
    context: BlockContext | None = None,
) -> torch.Tensor:
    """Push `hidden` through `layers` in order (one block's activations in memory at a time)."""
    for layer in layers:
        hidden = run_block(model, layer, hidden, batch_size, context)
    return hidden


@torch.no_grad()
def capture_states(
    model: PreTrainedModel, ids: torch.Tensor, batch_size: int = 8, desc: str | None = None
) -> list[torch.Tensor]:
    """`states[i]` is the input of block i on `ids`; `states[-1]` is the last block's output.

    Searches keep these so that evaluating an edit at block i costs only the blocks after i.
    """
    context = calibration_context(model, ids, batch_size)
    return refresh_states(model, [embed(model, ids)], 0, batch_size, context, desc)


@torch.no_grad()
def refresh_states(
    model: PreTrainedModel,
    states: list[torch.Tensor],
    start: int,
    batch_size: int = 8,
    context: BlockContext | None = None,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """The states of the model after an edit at block `start` (removal, merge).

    Inputs of blocks 0..start are unchanged (kept from `states`); the rest are recomputed.
    """
    layers = get_adapter(model).layers(model)
    fresh = list(states[: start + 1])
    for layer in tqdm(layers[start:], desc=desc, disable=desc is None, leave=False):
        fresh.append(run_block(model, layer, fresh[-1], batch_size, context))
    return fresh


@torch.no_grad()
def lm_loss(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of `ids` given the last block's output `hidden`.

    Logits over the vocabulary are large (tokens x vocab in float32), so they are built for
    `batch_size` sequences at a time.
    """
    total, count = 0.0, 0
    for start in range(0, hidden.shape[0], batch_size):
        logits = logits_from_hidden(model, hidden[start : start + batch_size]).float()
        labels = ids[start : start + batch_size, 1:].to(logits.device)
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        ).item()
        count += labels.numel()
    return total / count


@torch.no_grad()
def final_representation(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's last-layer representation (final norm applied), what the LM head reads."""
    return get_adapter(model).final_norm(model)(hidden)


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
