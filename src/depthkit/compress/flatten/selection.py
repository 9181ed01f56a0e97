"""Which adjacent blocks to flatten: iterative pair selection on calibration tokens.

Both criteria work on a `FlatteningState`: the current block list (original blocks and wide,
unpruned flattened blocks), the groups of original indices each position stands for, and a cache
of the hidden state entering every position. Flattening positions i, i+1 only changes what comes
after i, so a candidate is scored by re-running the blocks from i on (never the whole model), and
after a flatten only the cache from i on is refreshed.

- `similarity`: flatten the pair whose input (before i) and output (after i+1) are most alike
  (mean token cosine): the pair that changes the residual stream least is the most redundant.
- `local`: flatten the pair whose wide block best reproduces the two original blocks on their
  input (smallest squared error relative to the pair's update): one block run per candidate.
- `greedy`: flatten the pair whose (unpruned) flattening raises the calibration loss least,
  re-measured after every step. Costlier, and the spec's better choice; `shortlist` limits the
  end-to-end loss to the candidates with the smallest local flattening error.

`one_pass_pairs` is the variant for checkpoints streamed from disk: every adjacent pair of the
ORIGINAL model is scored in a single block-by-block pass (two blocks in memory), then the best
non-overlapping pairs are flattened. It cannot re-score after each flatten, which is what the
iterative selection above does with the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import relative_error, token_cosine
from depthkit.compress.common import lm_loss
from depthkit.compress.flatten.merge import QK_NORM_DEFAULT, flatten_layers, same_attention
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import block_context, embed, run_block

SELECTIONS = ("similarity", "local", "greedy")
ONE_PASS_SELECTIONS = ("similarity", "local")


class FlatteningState:
    """Current blocks, the original indices behind each, and the hidden state entering each."""

    def __init__(self, model: PreTrainedModel, ids: torch.Tensor, batch_size: int = 8, qk_norm: str = QK_NORM_DEFAULT):
        self.model, self.ids, self.batch_size, self.qk_norm = model, ids, batch_size, qk_norm
        self.original: list[nn.Module] = list(get_adapter(model).layers(model))
        self.groups: list[list[int]] = [[i] for i in range(len(self.original))]
        self.layers: list[nn.Module] = list(self.original)
        first = embed(model, ids)
        self.context = block_context(model, first[:batch_size])
        self.inputs: list[torch.Tensor] = [first]
        self.refresh(0)

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(self.model, layer, hidden, self.batch_size, self.context)

    def refresh(self, start: int) -> None:
        """Recompute the cached hidden states after position `start` (inputs[i+1] = layer i output)."""
        del self.inputs[start + 1 :]
        for layer in self.layers[start:]:
            self.inputs.append(self.run(layer, self.inputs[-1]))

    def candidates(self, max_group: int) -> list[int]:
        """Positions i such that flattening i and i+1 keeps groups within `max_group` blocks (of one attention type)."""
        return [i for i in range(len(self.layers) - 1)
                if len(self.groups[i]) + len(self.groups[i + 1]) <= max_group
                and same_attention(self.model, [self.original[j] for j in self.groups[i] + self.groups[i + 1]])]

    def merged(self, i: int) -> nn.Module:
        """The wide block flattening the ORIGINAL blocks behind positions i and i+1."""
        return flatten_layers(self.model, [self.original[j] for j in self.groups[i] + self.groups[i + 1]], self.qk_norm)

    def flatten(self, i: int) -> None:
        self.layers[i : i + 2] = [self.merged(i)]
        self.groups[i : i + 2] = [self.groups[i] + self.groups[i + 1]]
        self.refresh(i)

    def local_error(self, i: int, block: nn.Module) -> float:
        """Squared error of `block` on the input of i against the output of i+1, relative to its update."""
        return relative_error(self.run(block, self.inputs[i]), self.inputs[i + 2], self.inputs[i])

    def loss_with(self, i: int, block: nn.Module) -> float:
        """Calibration loss when positions i, i+1 are replaced by `block` (later blocks re-run)."""
        hidden = self.run(block, self.inputs[i])
        for layer in self.layers[i + 2 :]:
            hidden = self.run(layer, hidden)
        return lm_loss(self.model, hidden, self.ids)


def similarity_score(block_in: torch.Tensor, block_out: torch.Tensor) -> float:
    """Lower is better: negative mean token cosine between what enters and what leaves a pair."""
    return -token_cosine(block_in, block_out).mean().item()


def _similarity_scores(state: FlatteningState, candidates: list[int]) -> dict[int, float]:
    """Lower is better: negative mean cosine between the input of i and the output of i+1."""
    return {i: similarity_score(state.inputs[i], state.inputs[i + 2]) for i in candidates}


def _local_scores(state: FlatteningState, candidates: list[int]) -> dict[int, float]:
    return {i: state.local_error(i, state.merged(i)) for i in candidates}


def _greedy_scores(state: FlatteningState, candidates: list[int], shortlist: int) -> dict[int, float]:
    """Calibration loss after each candidate flatten (lower is better).

    With `shortlist` > 0 only the candidates with the smallest local flattening error (wide block
    vs the two original blocks, one block run each) get the costly end-to-end loss: the loss of a
    candidate costs every later block plus the LM head, the local error one block.
    """
    merged = {i: state.merged(i) for i in candidates}
    if 0 < shortlist < len(candidates):
        local = {i: state.local_error(i, merged[i]) for i in candidates}
        candidates = sorted(candidates, key=local.get)[:shortlist]
    return {i: state.loss_with(i, merged[i]) for i in candidates}


@torch.no_grad()
def select_groups(
    model: PreTrainedModel,
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

    Groups are lists of ORIGINAL block indices in order; a group of k blocks becomes one block.
    """
    require(selection in SELECTIONS, f"selection must be one of {', '.join(SELECTIONS)}, got '{selection}'")
    require(max_group >= 2, f"max_group must be at least 2, got {max_group}")
    num_layers = len(get_adapter(model).layers(model))
    require(
        num_remove <= num_layers - -(-num_layers // max_group),
        f"cannot remove {num_remove} of {num_layers} blocks with groups of at most {max_group} blocks",
    )
    state = FlatteningState(model, ids, batch_size, qk_norm)
    log = []
    for _ in tqdm(range(num_remove), desc=f"flatten selection ({selection})", disable=not progress):
        candidates = state.candidates(max_group)
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
    model: PreTrainedModel,
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    num_remove: int,
    selection: str = "local",
    batch_size: int = 8,
    qk_norm: str = QK_NORM_DEFAULT,
    progress: bool = True,
) -> tuple[list[list[int]], list[dict]]:
    """Groups of original indices flattening the `num_remove` best non-overlapping adjacent pairs.

    Every pair (i, i+1) is scored once on the original model, in one pass that holds two blocks
    and three hidden states: `layers` may load each block from disk on access. `hidden` is block
    0's input (the embedded calibration tokens).
    """
    require(selection in ONE_PASS_SELECTIONS,
            f"one-pass selection must be one of {', '.join(ONE_PASS_SELECTIONS)}, got '{selection}'")
    num_layers = len(layers)
    require(num_remove <= num_layers // 2, f"cannot remove {num_remove} of {num_layers} blocks with disjoint pairs")
    context = block_context(model, hidden[:batch_size])
    previous: tuple[nn.Module, torch.Tensor] | None = None  # (block i-1, its input)
    scores: dict[int, float] = {}
    for i in tqdm(range(num_layers), desc=f"pair scores ({selection})", disable=not progress):
        layer = layers[i]
        output = run_block(model, layer, hidden, batch_size, context)
        if previous is not None and same_attention(model, [previous[0], layer]):
            first, pair_in = previous
            if selection == "local":
                wide = flatten_layers(model, [first, layer], qk_norm)
                scores[i - 1] = relative_error(run_block(model, wide, pair_in, batch_size, context), output, pair_in)
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
