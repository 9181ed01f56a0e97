"""LaCo-style layer collapse (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse").

RDSC merge ("Reserving-Differences-while-Seeking-Common"): layers l+1..l+c are folded into layer l
by adding their parameter differences, `theta_l* = theta_l + sum_k (theta_{l+k} - theta_l)`, then
deleted. Merged are the linear weights and biases of attention and MLP; the norms of layer l are
kept (summing norm scales is not meaningful, and LaCo's own code merges the projections).

Search (the paper's Algorithm 1): start with the group at the top of the model and walk down. A
merge is accepted when the average per-token cosine similarity between the last-layer
representations (final norm applied) of the merged model and the current model on calibration
sequences is at least `threshold`; after an acceptance the walk continues below the new merged
layer (`interval` blocks further down), after a rejection one block lower. The paper stops when
the walk reaches the bottom; depthkit must hit the requested number of removed blocks, so when a
sweep ends short of it, the threshold is relaxed (by `relax`, and at least down to the best
similarity rejected in that sweep, which guarantees progress) and a new sweep starts from the top.
A layer takes part in one merge only, as in the paper's single walk (on SmolLM2, merging a merged
layer again destroyed the model: perplexity 1.2e7); only when no unmerged group is left are merged
layers merged again. The thresholds used are recorded on the card.

With `--offload disk` the same walk runs on the checkpoint's files (`_LaCoSearch`): a candidate
reads the layers of its group, merges them and runs the blocks above it one at a time from disk;
an accepted merge is kept as its recipe (`Merge`) and rebuilt from the files whenever it is run
again. Memory holds at most the layers_per_merge + 1 blocks one merge combines and the merged
block, plus the cached states of the selection sequences: no part of LaCo needs the whole model.
The price is reading (each candidate reads every block above it, a merged one as its whole group).

Measured on SmolLM2-135M (30 blocks, `benchmarks/compare_methods.py`): RDSC merges of 3 layers keep a
last-layer cosine of only ~0.5, far below what dropping blocks keeps: in a small model the layers'
parameter differences are not small, so summing them is destructive. Note that with
`layers_per_merge=1` RDSC gives theta_l + (theta_{l+1} - theta_l) = theta_{l+1}: dropping block l.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from depthkit.analysis.metrics import token_cosine
from depthkit.compress.base import option, register_method
from depthkit.compress.common import (
    BlockSearch,
    BlockSource,
    LoadedModel,
    SearchMethod,
    SearchOptions,
    selection_subset,
)
from depthkit.errors import require


def merged_parameter_names(layer: nn.Module) -> list[str]:
    """Parameters RDSC merges: every weight/bias of the block except normalisation weights."""
    return [name for name, _ in layer.named_parameters() if "norm" not in name]


@torch.no_grad()
def rdsc_merge(base: nn.Module, others: list[nn.Module]) -> nn.Module:
    """A new block: `base` plus the parameter differences of `others` (computed in float32)."""
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    for name in merged_parameter_names(merged):
        anchor = params[name].float()
        delta = sum(dict(other.named_parameters())[name].float() - anchor for other in others)
        params[name].copy_(anchor + delta)
    return merged


@dataclass
class LaCoOptions(SearchOptions):
    layers_per_merge: int = option(2, "layers folded into one per merge, C (default 2)")
    threshold: float = option(0.9, "minimum cosine of last-layer representations to accept a merge (default 0.9)")
    relax: float = option(0.05, "threshold decrease per extra sweep when the target is not reached (default 0.05)")
    interval: int = option(1, "blocks left untouched below an accepted merge (default 1)")
    lowest_layer: int = option(1, "lowest layer a merge may start at (default 1)")

    def validate(self) -> None:
        super().validate()
        require(self.layers_per_merge >= 1 and self.relax > 0 and self.interval >= 0 and self.lowest_layer >= 0,
                "laco options: layers_per_merge >= 1, relax > 0, interval >= 0, lowest_layer >= 0")


@register_method("laco")
class LaCo(SearchMethod):
    description = "LaCo layer collapse: merge runs of layers by adding parameter differences (RDSC)"
    options_class = LaCoOptions

    def search(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int
    ) -> tuple[BlockSearch, dict[str, Any]]:
        opts = self.settings
        depth = len(source.layers())
        require(opts.lowest_layer + num_remove < depth,
                f"laco cannot remove {num_remove} blocks above lowest_layer {opts.lowest_layer} of {depth}")
        search = _LaCoSearch(source, selection_subset(calib_ids, opts.selection_blocks), opts.batch_size)
        thresholds = search.collapse(num_remove, opts)
        return search, {
            "merges": search.merges,
            "removed_blocks": sorted(i for group in search.groups for i in group[1:]),
            "merged_groups": [group for group in search.groups if len(group) > 1],
            "thresholds": thresholds,
            "selection_tokens": list(search.ids.shape),
        }


@dataclass(frozen=True)
class Merge:
    """The recipe of a merged block: RDSC of `base` and `others`, entries of `_LaCoSearch.blocks`."""

    base: Any
    others: tuple[Any, ...]


class _LaCoSearch(BlockSearch):
    """The LaCo walk on a `BlockSearch`, whose positions also hold merged blocks.

    On a model in memory an accepted merge is kept as its module. On a streamed checkpoint it is
    kept as its `Merge` recipe and rebuilt from the original blocks, read from disk, whenever it
    is run (a merged layer merged again nests recipes): memory holds at most the blocks of one
    merge and the merged block, never every merged block. Nothing of LaCo needs more.
    """

    def __init__(self, source: BlockSource, ids: torch.Tensor, batch_size: int) -> None:
        super().__init__(source, ids, batch_size)
        self.keep_merged = isinstance(source, LoadedModel)
        self.reference = self.final(self.states[-1])
        self.groups = [[i] for i in range(self.depth())]  # original blocks behind each current block
        self.merges: list[dict] = []
        self.removed = 0
        self.remerge = False  # allowed only once no group of unmerged layers is left to try

    def load(self, position: int) -> nn.Module:
        return self.build(self.blocks[position])

    def build(self, block: Any) -> nn.Module:
        """The module of a `blocks` entry: an original block, a kept merged one, or a recipe's merge.

        Nested recipes are built first, so each is a single block before the plain layers of this
        merge are read: a merge never holds more than the layers_per_merge + 1 blocks it combines.
        """
        if not isinstance(block, Merge):
            return block if isinstance(block, nn.Module) else self.originals[block]
        entries = [block.base, *block.others]
        nested = {i: self.build(entry) for i, entry in enumerate(entries) if isinstance(entry, Merge)}
        parts = [nested.pop(i) if i in nested else self.build(entry) for i, entry in enumerate(entries)]
        return rdsc_merge(parts[0], parts[1:])

    def collapse(self, num_remove: int, opts: LaCoOptions) -> list[float]:
        """Sweep, relaxing the threshold, until `num_remove` blocks are merged away; the thresholds used."""
        threshold, thresholds = opts.threshold, []
        with tqdm(total=num_remove, desc="laco", leave=False) as bar:
            while self.removed < num_remove:
                thresholds.append(threshold)
                best_rejected = self.sweep(threshold, opts.layers_per_merge, opts.interval, opts.lowest_layer,
                                           num_remove, bar)
                self.remerge = self.remerge or best_rejected == float("-inf")
                threshold = min(threshold - opts.relax, best_rejected)
        return thresholds

    def sweep(self, threshold: float, per_merge: int, interval: int, lowest: int, target: int, bar) -> float:
        """One walk from the top down; returns the best similarity it rejected (-inf if none)."""
        best_rejected = float("-inf")
        # Never start below `lowest`: with lowest + remaining < depth (checked up front, kept by every
        # merge) each sweep evaluates at least one candidate, so relaxing the threshold makes progress.
        start = max(self.depth() - 1 - per_merge, lowest)
        while start >= lowest and self.removed < target:
            count = min(per_merge, target - self.removed, self.depth() - 1 - start)
            if not self.remerge and any(len(g) > 1 for g in self.groups[start : start + 1 + count]):
                start -= 1  # a layer takes part in one merge only (merging merges compounds the damage)
                continue
            block, similarity = self._candidate(start, count)
            if similarity < threshold:
                best_rejected = max(best_rejected, similarity)
                start -= 1
                continue
            self._accept(start, count, block, similarity, threshold)
            bar.update(count)
            start = min(start - interval - per_merge, self.depth() - 1 - per_merge)
        return best_rejected

    def _candidate(self, start: int, count: int) -> tuple[Any, float]:
        """Positions start..start+count merged: the entry that stands for the merge, and its similarity."""
        recipe = Merge(self.blocks[start], tuple(self.blocks[start + 1 : start + 1 + count]))
        merged = self.build(recipe)
        hidden = self.run(merged, self.states[start])
        block = merged if self.keep_merged else recipe  # streamed: dropped now, rebuilt when run again
        del merged
        hidden = self.run_from(start + 1 + count, hidden)
        return block, float(token_cosine(self.final(hidden), self.reference).mean())

    def _accept(self, start: int, count: int, block: Any, similarity: float, threshold: float) -> None:
        group = [i for g in self.groups[start : start + 1 + count] for i in g]
        self.groups[start : start + 1 + count] = [group]
        self.merges.append({"blocks": group, "similarity": similarity, "threshold": threshold})
        self.removed += count
        self.replace(start, start + 1 + count, [block])
        self.reference = self.final(self.states[-1])
