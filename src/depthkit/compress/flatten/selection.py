"""Which adjacent blocks to flatten: iterative pair selection on calibration tokens.

Every criterion works on a `FlatteningState`, a `BlockStates` whose positions stand for groups of
original blocks (one original block, or the wide block flattening a group) with the hidden state
entering every position. Flattening positions i, i+1 only changes what comes after i, so a
candidate is scored by re-running the blocks from i on (never the whole model), and after a
flatten only the states from i on are refreshed.

- `similarity`: flatten the pair whose input (before i) and output (after i+1) are most alike
  (mean token cosine): the pair that changes the residual stream least is the most redundant.
- `local`: flatten the pair whose wide block best reproduces the two original blocks on their
  input (smallest squared error relative to the pair's update): one block run per candidate.
- `greedy`: flatten the pair whose (unpruned) flattening raises the calibration loss least,
  re-measured after every step. Costlier, and the spec's better choice; `shortlist` limits the
  end-to-end loss to the candidates with the smallest local flattening error.

The state reads the model through a `BlockSource`, so the same selection, with the same result,
runs on a model in memory and on a checkpoint streamed from disk (`--offload disk`): there a wide
block is rebuilt from its original blocks whenever it runs, and memory holds one group's blocks,
its wide block and the states of the selection sequences.

`one_pass_pairs` is the cheaper variant (option `rescore=false`): every adjacent pair of the
ORIGINAL model is scored in a single block-by-block pass (two blocks in memory), then the best
non-overlapping pairs are flattened, without re-scoring after each flatten.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import relative_error, token_cosine
from depthkit.compress.flatten.merge import QK_NORM_DEFAULT, flatten_layers, same_attention
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.runner import BlockRunner, BlockSource, BlockStates, as_source

SELECTIONS = ("similarity", "local", "greedy")
ONE_PASS_SELECTIONS = ("similarity", "local")


class FlatteningState(BlockStates):
    """Current blocks as groups of original indices, and the hidden state entering each.

    A flattened position's `blocks` entry is its wide block in memory, or on a streamed checkpoint
    the tuple of its original indices, rebuilt from disk whenever it runs (never every wide block).
    """

    def __init__(self, source: BlockSource, ids: torch.Tensor, batch_size: int = 8, qk_norm: str = QK_NORM_DEFAULT):
        adapter = get_adapter(source.model)
        # Attention types from the model's own modules (the skeleton's, when streamed: nothing read).
        self.types = [adapter.layer_type(layer, source.model.config) for layer in adapter.layers(source.model)]
        self.qk_norm = qk_norm
        self.keep_built = source.keeps_blocks
        super().__init__(source, ids, batch_size)
        self.groups: list[list[int]] = [[i] for i in range(self.depth())]

    def load(self, position: int) -> nn.Module:
        entry: Any = self.blocks[position]
        if isinstance(entry, nn.Module):
            return entry
        return self.build(list(entry)) if isinstance(entry, tuple) else self.originals[entry]

    def build(self, group: list[int]) -> nn.Module:
        """The wide block flattening the ORIGINAL blocks of `group`."""
        return flatten_layers(self.source.model, [self.originals[j] for j in group], self.qk_norm)

    def candidates(self, max_group: int) -> list[int]:
        """Positions i such that flattening i and i+1 keeps groups within `max_group` blocks (of one attention type)."""
        return [i for i in range(self.depth() - 1)
                if len(self.groups[i]) + len(self.groups[i + 1]) <= max_group
                and len({self.types[j] for j in self.groups[i] + self.groups[i + 1]}) == 1]

    def merged(self, i: int) -> nn.Module:
        """The wide block flattening the original blocks behind positions i and i+1."""
        return self.build(self.groups[i] + self.groups[i + 1])

    def flatten(self, i: int) -> None:
        group = self.groups[i] + self.groups[i + 1]
        self.groups[i : i + 2] = [group]
        self.replace(i, i + 2, [self.build(group) if self.keep_built else tuple(group)])

    def local_error(self, i: int, block: nn.Module) -> float:
        """Squared error of `block` on the input of i against the output of i+1, relative to its update."""
        return relative_error(self.run(block, self.states[i]), self.states[i + 2], self.states[i])

    def loss_with(self, i: int, block: nn.Module) -> float:
        """Calibration loss when positions i, i+1 are replaced by `block` (later blocks re-run)."""
        return self.loss(self.run_from(i + 2, self.run(block, self.states[i])))


def similarity_score(block_in: torch.Tensor, block_out: torch.Tensor) -> float:
    """Lower is better: negative mean token cosine between what enters and what leaves a pair."""
    return -token_cosine(block_in, block_out).mean().item()


def _similarity_scores(state: FlatteningState, candidates: list[int]) -> dict[int, float]:
    """Lower is better: negative mean cosine between the input of i and the output of i+1."""
    return {i: similarity_score(state.states[i], state.states[i + 2]) for i in candidates}


def _local_scores(state: FlatteningState, candidates: list[int]) -> dict[int, float]:
    """Each candidate's wide block is built, run once and dropped."""
    return {i: state.local_error(i, state.merged(i)) for i in candidates}


def _greedy_scores(state: FlatteningState, candidates: list[int], shortlist: int) -> dict[int, float]:
    """Calibration loss after each candidate flatten (lower is better).

    With `shortlist` > 0 only the candidates with the smallest local flattening error (wide block
    vs the two original blocks, one block run each) get the costly end-to-end loss: the loss of a
    candidate costs every later block plus the LM head, the local error one block. A wide block
    is built again for its loss rather than kept from its local error: memory then holds one wide
    block, not one per candidate (building is cheap next to running the blocks after it).
    """
    if 0 < shortlist < len(candidates):
        local = _local_scores(state, candidates)
        candidates = sorted(candidates, key=local.get)[:shortlist]
    return {i: state.loss_with(i, state.merged(i)) for i in candidates}


@torch.no_grad()
def select_groups(
    model: PreTrainedModel | BlockSource,
    ids: torch.Tensor,
    num_remove: int,
    selection: str = "greedy",
    max_group: int = 2,
    batch_size: int = 8,
    qk_norm: str = QK_NORM_DEFAULT,
    shortlist: int = 8,
    progress: bool = True,
) -> tuple[list[list[int]], list[dict]]:
    """Flatten `num_remove` times (lowest score first); returns the groups and a step log.

    `model` is a model in memory or a `BlockSource` (a `StreamingModel`: the same groups, read from
    disk). Groups are lists of ORIGINAL block indices in order; a group of k blocks becomes one block.
    """
    require(selection in SELECTIONS, f"selection must be one of {', '.join(SELECTIONS)}, got '{selection}'")
    require(max_group >= 2, f"max_group must be at least 2, got {max_group}")
    source = as_source(model)
    num_layers = len(source.layers())
    require(
        num_remove <= num_layers - -(-num_layers // max_group),
        f"cannot remove {num_remove} of {num_layers} blocks with groups of at most {max_group} blocks",
    )
    state = FlatteningState(source, ids, batch_size, qk_norm)
    log = []
    for _ in tqdm(range(num_remove), desc=f"flatten selection ({selection})", disable=not progress):
        candidates = state.candidates(max_group)
        require(bool(candidates), f"after {len(log)} flattens no two adjacent blocks can be flattened (groups of at "
                                  f"most {max_group} blocks of one attention type): {num_remove} is too many for "
                                  "this model")
        if selection == "greedy":
            scores = _greedy_scores(state, candidates, shortlist)
        elif selection == "local":
            scores = _local_scores(state, candidates)
        else:
            scores = _similarity_scores(state, candidates)
        best = min(scores, key=scores.get)
        log.append({"flattened": state.groups[best] + state.groups[best + 1], "score": scores[best]})
        state.flatten(best)
    return state.groups, log


@torch.no_grad()
def one_pass_pairs(
    model: PreTrainedModel | BlockSource,
    ids: torch.Tensor,
    num_remove: int,
    selection: str = "local",
    batch_size: int = 8,
    qk_norm: str = QK_NORM_DEFAULT,
    progress: bool = True,
) -> tuple[list[list[int]], list[dict]]:
    """Groups of original indices flattening the `num_remove` best non-overlapping adjacent pairs.

    Every pair (i, i+1) is scored once on the original model, in one pass over `ids` that holds two
    blocks and three hidden states: a streamed source loads each block from disk on access.
    """
    require(selection in ONE_PASS_SELECTIONS,
            f"one-pass selection must be one of {', '.join(ONE_PASS_SELECTIONS)}, got '{selection}'")
    source = as_source(model)
    layers = source.layers()
    num_layers = len(layers)
    require(num_remove <= num_layers // 2, f"cannot remove {num_remove} of {num_layers} blocks with disjoint pairs")
    hidden = source.embed(ids)
    runner = BlockRunner(source.model, hidden, batch_size)
    previous: tuple[nn.Module, torch.Tensor] | None = None  # (block i-1, its input)
    scores: dict[int, float] = {}
    for i in tqdm(range(num_layers), desc=f"pair scores ({selection})", disable=not progress):
        layer = layers[i]
        output = runner.block(layer, hidden)
        if previous is not None and same_attention(source.model, [previous[0], layer]):
            first, pair_in = previous
            if selection == "local":
                wide = flatten_layers(source.model, [first, layer], qk_norm)
                scores[i - 1] = relative_error(runner.block(wide, pair_in), output, pair_in)
            else:
                scores[i - 1] = similarity_score(pair_in, output)
        previous, hidden = (layer, hidden), output
    chosen: list[int] = []
    for i in sorted(scores, key=scores.get):
        if len(chosen) < num_remove and all(abs(i - j) > 1 for j in chosen):
            chosen.append(i)
    require(len(chosen) == num_remove, f"only {len(chosen)} disjoint pairs found for {num_remove} removals")
    firsts = set(chosen)
    groups = []
    for i in range(num_layers):
        if i - 1 not in firsts:
            groups.append([i, i + 1] if i in firsts else [i])
    log = [{"flattened": [i, i + 1], "score": scores[i]} for i in sorted(chosen, key=scores.get)]
    return groups, log
