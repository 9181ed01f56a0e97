"""Building blocks shared by the depth-compression methods.

Every block-removal or merging baseline needs the same few things: the hidden states entering each
block on calibration tokens (captured once, block by block), a way to re-run only the blocks after
an edit, the calibration loss or final representation of a candidate model, and a way to cut
blocks out so the checkpoint stays a plain Hugging Face model. Keeping them here means a search
(SLEB, LaCo) never re-runs the unchanged prefix of the model and never duplicates this code.
`BlockSearch` reads the model through a `BlockSource`, so the same search runs on a model in
memory (`LoadedModel`) and on a checkpoint streamed block by block from disk (`StreamingModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from depthkit.compress.base import CompressionMethod, CompressionOutcome, MethodOptions, option
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import BlockContext, block_context, embed, logits_from_hidden, run_block

if TYPE_CHECKING:
    from depthkit.models.streaming import StreamingModel, StreamingWriter


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


class BlockSource(Protocol):
    """What a search reads a model through: a model in memory (`LoadedModel`) or a `StreamingModel`.

    `model` runs the blocks (config, rotary tables, final norm); `layers()[i]` is original block
    i, which a `StreamingModel` reads from disk on every access and frees when it is dropped.
    """

    model: PreTrainedModel

    def layers(self) -> Sequence[nn.Module]: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def context(self, hidden: torch.Tensor) -> BlockContext: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...


class LoadedModel:
    """A model in memory as a `BlockSource`, so one search serves both it and a streamed checkpoint."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def layers(self) -> Sequence[nn.Module]:
        return get_adapter(self.model).layers(self.model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed(self.model, input_ids)

    def context(self, hidden: torch.Tensor) -> BlockContext:
        return block_context(self.model, hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_from_hidden(self.model, hidden)


class BlockSearch:
    """A model under a search: what stands at each position, and the hidden state entering each.

    `blocks[p]` says which block is at position p (an original block index here; `load` turns it
    into a module, and subclasses that build new blocks, like LaCo's merges, extend it).
    `states[p]` is the input of position p on the calibration tokens and `states[-1]` the last
    block's output, so a candidate edit at position p re-runs only the blocks after it, and after
    an edit only the states from p on are refreshed. Blocks are loaded one at a time and dropped
    after use: on a `StreamingModel` the search holds one block's weights plus these states.
    """

    def __init__(self, source: BlockSource, ids: torch.Tensor, batch_size: int = 8) -> None:
        self.source, self.ids, self.batch_size = source, ids, batch_size
        self.originals = source.layers()
        self.blocks: list[Any] = list(range(len(self.originals)))
        first = source.embed(ids)
        self.context = source.context(first[:batch_size])
        self.states = [first]
        self.refresh(0)

    def depth(self) -> int:
        return len(self.blocks)

    def load(self, position: int) -> nn.Module:
        return self.originals[self.blocks[position]]

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(self.source.model, layer, hidden, self.batch_size, self.context)

    @torch.no_grad()
    def run_from(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` pushed through the current blocks from `position` to the last."""
        for index in range(position, self.depth()):
            hidden = self.run(self.load(index), hidden)
        return hidden

    @torch.no_grad()
    def refresh(self, start: int) -> None:
        """Recompute the states after an edit at `start`; the inputs of positions 0..start stand."""
        del self.states[start + 1 :]
        for index in range(start, self.depth()):
            self.states.append(self.run(self.load(index), self.states[-1]))

    def replace(self, start: int, stop: int, blocks: list[Any]) -> None:
        """Put `blocks` (none: a removal) in place of positions start..stop-1 and refresh."""
        self.blocks[start:stop] = blocks
        self.refresh(start)

    def loss(self, hidden: torch.Tensor) -> float:
        return head_loss(self.source.head, hidden, self.ids)

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return final_representation(self.source.model, hidden)

    def apply_to(self, model: PreTrainedModel) -> None:
        """Make the current blocks `model`'s blocks (the model in memory the search ran on)."""
        get_adapter(model).set_layers(model, [self.load(index) for index in range(self.depth())])

    def write_to(self, writer: StreamingWriter) -> None:
        """Write the current blocks in order, one loaded at a time."""
        for index in range(self.depth()):
            writer.write_layer(index, self.load(index))


class SearchMethod(CompressionMethod):
    """A method that edits a `BlockSearch` and keeps its final blocks: in memory, or streamed.

    Subclasses implement `search`; the model in memory then takes the blocks found, and with
    `--offload disk` they are written to the new checkpoint one at a time.
    """

    @torch.no_grad()
    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        search, details = self.search(LoadedModel(model), calib_ids, num_remove)
        search.apply_to(model)
        return CompressionOutcome(details)

    @torch.no_grad()
    def compress_streaming(
        self, source: StreamingModel, calib_ids: torch.Tensor, num_remove: int, writer: StreamingWriter
    ) -> CompressionOutcome:
        """The same search with blocks read from disk when needed, then the result copied block by block."""
        search, details = self.search(source, calib_ids, num_remove)
        search.write_to(writer)
        return CompressionOutcome(details)

    def search(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int
    ) -> tuple[BlockSearch, dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError


@torch.no_grad()
def capture_states(model: PreTrainedModel, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """`states[i]` is the input of block i on `ids`; `states[-1]` is the last block's output."""
    return BlockSearch(LoadedModel(model), ids, batch_size).states


@torch.no_grad()
def lm_loss(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of `ids` given the last block's output `hidden`."""
    return head_loss(partial(logits_from_hidden, model), hidden, ids, batch_size)


@torch.no_grad()
def head_loss(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor, batch_size: int = 4
) -> float:
    """`lm_loss` with the logits from `head` (a model's final norm + LM head, or a `StreamingModel`'s).

    Logits over the vocabulary are large (tokens x vocab in float32), so they are built for
    `batch_size` sequences at a time.
    """
    total, count = 0.0, 0
    for start in range(0, hidden.shape[0], batch_size):
        logits = head(hidden[start : start + batch_size]).float()
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
