"""The one block runner: a model's blocks over calibration activations, in memory or streamed.

Every method and analysis that needs block inputs and outputs on calibration tokens reads the
model through a `BlockSource`, of which there are two backends behind the same interface:
`InMemoryModel` (a loaded model) and `StreamingModel` (`models/streaming.py`: a checkpoint whose
blocks are read from its safetensors files one at a time, so memory is one block plus its
activations). On top of a source:

- `BlockRunner` runs a block, or its attention or MLP half, over all calibration sequences
  `batch_size` at a time with one set of rotary tables and masks;
- `iterate_blocks` is one front-to-back pass, `(index, block input, block output)` per block;
- `BlockStates` is the one cache of block states: which block stands at each position and the
  hidden state entering each, so an edit at position p re-runs only the blocks after p.

What a method produces goes to a `BlockSink`, block by block in order: `ModelSink` makes them a
model's blocks, `StreamingWriter` writes them to a new checkpoint. A method written against a
source and a sink is therefore written once and runs both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import BlockContext, block_context, embed, logits_from_hidden, run_block


class BlockSource(Protocol):
    """A model read block by block: `InMemoryModel` or `StreamingModel`.

    `model` holds the config, rotary tables and final norm (a meta-device skeleton when
    streamed); `layers()[i]` is original block i, which a `StreamingModel` reads from disk on
    every access and frees when it is dropped. `keeps_blocks` says whether blocks a method builds
    (merged, flattened) may be kept in memory, or must be rebuilt from their recipe when run.
    """

    model: PreTrainedModel
    keeps_blocks: bool

    def layers(self) -> Sequence[nn.Module]: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...


class BlockSink(Protocol):
    """Where a method's blocks go, in order 0, 1, 2...: `ModelSink` or `StreamingWriter`.
    `set_widths` records that every block now has `heads` query heads and `intermediate` MLP
    neurons (width pruning), for the config written with the blocks."""

    def write_layer(self, index: int, layer: nn.Module) -> None: ...

    def set_widths(self, heads: int, intermediate: int) -> None: ...


class InMemoryModel:
    """A loaded model as a `BlockSource`: its own modules, nothing read from disk."""

    keeps_blocks = True

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def layers(self) -> Sequence[nn.Module]:
        return get_adapter(self.model).layers(self.model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed(self.model, input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_from_hidden(self.model, hidden)


def as_source(model: PreTrainedModel | BlockSource) -> BlockSource:
    """A loaded model wrapped as a source; a source as it is (so functions take either)."""
    return InMemoryModel(model) if isinstance(model, PreTrainedModel) else model


class ModelSink:
    """Blocks written in order become `model`'s blocks when the sink finishes (the in-memory
    counterpart of `StreamingWriter`). As a context manager it finishes on leaving normally."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.blocks: list[nn.Module] = []
        self.widths: tuple[int, int] | None = None

    def __enter__(self) -> ModelSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()

    def write_layer(self, index: int, layer: nn.Module) -> None:
        require(index == len(self.blocks), f"blocks must be written in order: expected {len(self.blocks)}, got {index}")
        self.blocks.append(layer)

    def set_widths(self, heads: int, intermediate: int) -> None:
        self.widths = (heads, intermediate)

    def finish(self) -> None:
        adapter = get_adapter(self.model)
        adapter.set_layers(self.model, self.blocks)
        if self.widths is not None:
            adapter.set_widths(self.model, *self.widths)


class BlockRunner:
    """Runs blocks or their halves over all calibration sequences, `batch_size` at a time.

    The rotary tables and masks are built once, from the first batch of `hidden`, and reused
    for every block and chunk of the same length.
    """

    def __init__(self, model: PreTrainedModel, hidden: torch.Tensor, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.adapter = get_adapter(model)
        self.context: BlockContext = block_context(model, hidden[:batch_size])

    def block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(self.model, layer, hidden, self.batch_size, self.context)

    @torch.no_grad()
    def attention(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The attention update A(N(x)) of `layer` (without the residual)."""
        kwargs = self.context.layer_kwargs(layer)
        return torch.cat([self.adapter.attention_update(layer, c, **kwargs) for c in hidden.split(self.batch_size)])

    @torch.no_grad()
    def mlp(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The MLP update M(P(x)) of `layer` (without the residual)."""
        return torch.cat([self.adapter.mlp_update(layer, c) for c in hidden.split(self.batch_size)])

    def sequential(self, layers: list[nn.Module], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of attention updates, output) of `layers` applied one after the other."""
        attn_sum = torch.zeros_like(hidden, dtype=torch.float32)
        for layer in layers:
            update = self.attention(layer, hidden)
            attn_sum += update.float()
            hidden = hidden + update
            hidden = hidden + self.mlp(layer, hidden)
        return attn_sum, hidden


@torch.no_grad()
def iterate_blocks(
    model: PreTrainedModel | BlockSource, input_ids: torch.Tensor, batch_size: int = 8
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield `(index, block_input, block_output)` for every block, one block in memory at a time."""
    source = as_source(model)
    layers = source.layers()
    hidden = source.embed(input_ids)
    runner = BlockRunner(source.model, hidden, batch_size)
    for index in range(len(layers)):
        layer = layers[index]
        output = runner.block(layer, hidden)
        del layer  # a streamed block is freed before the caller asks for the next
        yield index, hidden, output
        hidden = output


class BlockStates:
    """A model under edit: what stands at each position, and the hidden state entering each.

    `blocks[p]` says which block is at position p (an original block index here; `load` turns it
    into a module, and subclasses that build new blocks, like LaCo's merges, extend it).
    `states[p]` is the input of position p on the calibration tokens and `states[-1]` the last
    block's output, so a candidate edit at position p re-runs only the blocks after it, and after
    an edit only the states from p on are refreshed. Blocks are loaded one at a time and dropped
    after use: on a `StreamingModel` this holds one block's weights plus these states.
    """

    def __init__(self, source: BlockSource, ids: torch.Tensor, batch_size: int = 8) -> None:
        self.source, self.ids, self.batch_size = source, ids, batch_size
        self.originals = source.layers()
        self.blocks: list[Any] = list(range(len(self.originals)))
        first = source.embed(ids)
        self.runner = BlockRunner(source.model, first, batch_size)
        self.states = [first]
        self.refresh(0)

    def depth(self) -> int:
        return len(self.blocks)

    def load(self, position: int) -> nn.Module:
        return self.originals[self.blocks[position]]

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner.block(layer, hidden)

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


@torch.no_grad()
def head_loss(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor, batch_size: int = 4
) -> float:
    """Mean next-token negative log-likelihood of `ids` given the last block's output `hidden`,
    with the logits from `head` (a source's final norm + LM head).

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
