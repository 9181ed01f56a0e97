"""LaCo layer collapse (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse").

RDSC merge ("Reserving-Differences-while-Seeking-Common"): the C - 1 layers after layer l are folded
into it by adding their parameter differences, `theta_l* = theta_l + sum_k (theta_{l+k} - theta_l)`,
then deleted. Merged are every weight and bias of attention and MLP; the norms of layer l are kept.
The authors' released notebooks apply the differences with an in-place `add_` that reads the
already-updated base, so what they compute (and what their published numbers measured) is layer
l's norms with the projections of the group's LAST layer: a drop of layers l..l+C-2. `merge=drop`
is that computation, `merge=rdsc` (default) the paper's formula.

Search (the paper's Algorithm 1, as in the released notebooks): start at layer H - C and walk down.
A candidate merges the current layers l..l+C-1 (fewer near the top); it is accepted when the cosine
similarity of the final representation of the merged model and of the ORIGINAL model, each
sequence flattened to one vector and averaged over calibration sequences, exceeds `threshold`.
After an acceptance the walk moves `interval` layers down (so with interval < C the next group
contains the merged layer: overlapping re-merges, as in the paper), after a rejection one layer.
The walk ends at `lowest_layer`, or as soon as the requested number of blocks is removed. If the
threshold cannot reach the requested depth, LaCo merges less: the card says how deep the model
got (`target_reached`). With `bisect=true` the walk is repeated with the threshold bisected down to
`threshold_floor` (default 0.45, the lowest threshold in the authors' notebooks) and the highest
threshold that reaches the requested depth is kept.

Plan: the accepted merges in the order the walk accepted them, each with its position among the
blocks of that moment, the blocks it removes and its similarity (`reuse` "prefix"). The walk for
k' < k blocks makes the same candidates and decisions as the walk for k until it has removed k':
a candidate's size is min(C - 1, blocks above it, blocks still to remove), and between two
accepted merges the walk only descends, so while k' leaves room for the next merge the walk for k
accepts, every candidate up to it has the same size in both walks. The first merges of a plan
are therefore exactly a fresh walk for the count they remove; a count that falls inside a merge
would have made that merge smaller (another candidate) and is refused. Once `bisect` has lowered
the threshold, it is the highest that reaches k, which depends on k: such a plan serves only k.
Apply rebuilds the merges from the original blocks (the same arithmetic as the search's).

With `--offload disk` the same walk runs on the checkpoint's files (`_LaCoSearch`): a candidate
reads the layers of its group, merges them and runs the blocks above it one at a time from disk;
an accepted merge is kept as its recipe (`Merge`) and rebuilt from the files whenever it is run
again. Memory holds at most the C blocks one merge combines and the merged block, plus the cached
states of the selection sequences.

Measured on SmolLM2-135M (30 blocks): RDSC of 4 layers keeps a final-representation cosine far
below the paper's 0.65 (the layers' parameter differences are not small in a small model), so at
the paper's threshold LaCo removes fewer blocks than asked; `compare_methods` reports the depth it
reached beside its quality.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from depthkit.compress.base import CompressionMethod, CompressionOutcome, option, register_method
from depthkit.compress.common import SearchOptions, selection_subset
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import require, warn
from depthkit.models.runner import BlockSink, BlockSource, BlockStates

MERGES = ("rdsc", "drop")


def merged_parameter_names(layer: nn.Module) -> list[str]:
    """Parameters a merge combines: every weight/bias of the block except normalisation weights."""
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


@torch.no_grad()
def drop_merge(base: nn.Module, others: list[nn.Module]) -> nn.Module:
    """What the released LaCo code computes: `base`'s norms with the last of `others`' projections."""
    merged = copy.deepcopy(base)
    params, last = dict(merged.named_parameters()), dict(others[-1].named_parameters())
    for name in merged_parameter_names(merged):
        params[name].copy_(last[name])
    return merged


MERGE_FUNCTIONS = {"rdsc": rdsc_merge, "drop": drop_merge}


def sequence_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over sequences of the cosine of two (sequences, tokens, dim) tensors, each sequence
    flattened to one vector (the LaCo notebooks' similarity), in float32."""
    a, b = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@dataclass
class LaCoOptions(SearchOptions):
    merge_layers: int = option(4, "layers combined into one per merge, C (default 4, the paper's)")
    threshold: float = option(0.65, "accept a merge when the final-representation cosine with the original model "
                                    "exceeds this, T (default 0.65, the paper's)")
    interval: int = option(2, "layers the walk moves down after an accepted merge, I (default 2, the paper's)")
    lowest_layer: int = option(0, "lowest layer a merge may start at, L (default 0)")
    highest_layer: int = option(-1, "highest layer, H: the walk starts at H - C (default -1: the last layer)")
    merge: str = option("rdsc", "rdsc: the paper's sum of differences (default); drop: what the released code "
                                "computes (the group's last layer's projections)")
    bisect: bool = option(False, "if the threshold cannot reach the requested depth, bisect it down to "
                                 "threshold_floor (default false: merge less and say so)")
    threshold_floor: float = option(0.45, "lowest threshold `bisect` tries (default 0.45, the lowest the "
                                          "authors' notebooks use)")

    def validate(self) -> None:
        super().validate()
        require(self.merge_layers >= 2 and self.interval >= 1 and self.lowest_layer >= 0 and self.highest_layer >= -1,
                "laco options: merge_layers >= 2, interval >= 1, lowest_layer >= 0, highest_layer >= -1")
        require(self.merge in MERGES, f"laco option merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        require(-1.0 <= self.threshold <= 1.0 and -1.0 <= self.threshold_floor <= 1.0,
                "laco options: threshold and threshold_floor are cosines, in -1..1")
        require(not self.bisect or self.threshold_floor <= self.threshold,
                f"laco options: bisect needs threshold_floor <= threshold, got {self.threshold_floor} "
                f"and {self.threshold}")


@register_method("laco")
class LaCo(CompressionMethod):
    description = "LaCo layer collapse: walk down merging runs of layers (RDSC) while the output stays similar"
    options_class = LaCoOptions
    step_keys = ("position", "removes", "blocks", "score")
    paper = "Yang et al., 2024, LaCo: Large Language Model Pruning via Layer Collapse (EMNLP 2024 Findings)"

    def deviations(self) -> list[str]:
        opts = self.settings
        found = [
            "defaults C=4, I=2, T=0.65 are the paper's settings for its 7B-13B models (32-40 layers); the released "
            "notebooks use C=3, T=0.6 (Baichuan2-13B) and C=7, T=0.45 (Llama2-13B), both with I=1; nobody tuned "
            "them for a model of this size",
            "calibration: the notebooks compare 5 short Wikipedia sentence openings; here the first "
            f"{opts.selection_blocks} calibration sequences (card: calibration)",
            "the walk stops once the requested number of blocks is removed (the paper walks on to L)",
            "biases (Qwen-style blocks) are merged like weights; the notebooks merge the projection weights of "
            "models without biases",
        ]
        if opts.merge == "drop":
            found.append("merge=drop: the released code's in-place update, i.e. each group keeps its last layer's "
                         "projections, not the paper's RDSC sum")
        if opts.bisect:
            found.append(f"bisect: the threshold was lowered (down to at most {opts.threshold_floor}) until the "
                         "requested depth was reached; the paper keeps T fixed and merges less")
        return found

    @torch.no_grad()
    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        opts = self.settings
        ids = selection_subset(calib_ids, opts.selection_blocks)
        search, tried = self._walk(source, ids, num_remove, opts.threshold), [opts.threshold]
        if opts.bisect and search.removed < num_remove:
            search, tried = self._bisect(source, ids, num_remove, search, tried)
        bisected = len(tried) > 1
        return self.new_plan(source, num_remove, "exact" if bisected else "prefix", search.steps,
                             {"threshold": search.threshold, "thresholds_tried": tried,
                              "selection_tokens": list(ids.shape)},
                             "its threshold was bisected to the highest that reaches this count" if bisected else "")

    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """The plan's first merges replayed on the original blocks, each merged block built once
        (from its recipe, read from the files when streamed) as it is written."""
        steps = plan.steps[: plan.steps_for(num_remove)]
        layers = source.layers()
        blocks: list[Any] = list(range(len(layers)))
        groups = [[i] for i in range(len(layers))]
        for step in steps:
            start, stop = step["position"], step["position"] + 1 + step["removes"]
            require(stop <= len(blocks) and [i for g in groups[start:stop] for i in g] == step["blocks"],
                    f"the plan merges blocks {step['blocks']} at position {start}, which the blocks left by its "
                    "earlier merges do not hold: the plan is damaged")
            groups[start:stop] = [step["blocks"]]
            blocks[start:stop] = [Merge(blocks[start], tuple(blocks[start + 1 : stop]), self.settings.merge)]
        removed = sum(step["removes"] for step in steps)
        threshold = plan.details.get("threshold")
        if removed < num_remove:
            warn(f"laco reached {len(blocks)} blocks, not the {len(layers) - num_remove} requested: no further merge "
                 f"kept the output similar above threshold {threshold}"
                 + ("" if self.settings.bisect else " (option bisect=true lowers it)"))
        for index, block in enumerate(blocks):
            sink.write_layer(index, build_block(block, layers))
        return CompressionOutcome({
            "merges": [{"blocks": step["blocks"], "similarity": step["score"]} for step in steps],
            "removed_blocks": sorted(i for group in groups for i in group[1:]),
            "merged_groups": [group for group in groups if len(group) > 1],
            "threshold": threshold,
            "thresholds_tried": plan.details.get("thresholds_tried"),
            "blocks_removed": removed,
            "target_reached": removed == num_remove,
            "selection_tokens": plan.details.get("selection_tokens"),
        })

    def _walk(self, source: BlockSource, ids: torch.Tensor, num_remove: int, threshold: float) -> _LaCoSearch:
        search = _LaCoSearch(source, ids, self.settings, threshold)
        search.walk(num_remove)
        return search

    def _bisect(
        self, source: BlockSource, ids: torch.Tensor, num_remove: int, best: _LaCoSearch, tried: list[float],
        steps: int = 6,
    ) -> tuple[_LaCoSearch, list[float]]:
        """The highest threshold in [floor, threshold] whose walk reaches the requested depth (if the
        floor's does); else the walk at the floor, which merges the most LaCo is allowed to."""
        low, high = self.settings.threshold_floor, self.settings.threshold
        floor = self._walk(source, ids, num_remove, low)
        tried.append(low)
        if floor.removed < num_remove:
            return (floor if floor.removed > best.removed else best), tried
        best = floor
        for _ in range(steps):
            middle = (low + high) / 2
            candidate = self._walk(source, ids, num_remove, middle)
            tried.append(middle)
            if candidate.removed == num_remove:
                best, low = candidate, middle
            else:
                high = middle
        return best, tried


@dataclass(frozen=True)
class Merge:
    """The recipe of a merged block: `kind` merge of `base` and `others`, entries of `_LaCoSearch.blocks`."""

    base: Any
    others: tuple[Any, ...]
    kind: str = "rdsc"


def build_block(block: Any, originals: Sequence[nn.Module]) -> nn.Module:
    """The module of a block entry: an original block's index, a merged block kept in memory, or a
    `Merge` recipe, built from the original blocks (read from disk when streamed).

    Nested recipes are built first, so each is a single block before the plain layers of this
    merge are read: a merge never holds more than the C blocks it combines plus its result.
    """
    if not isinstance(block, Merge):
        return block if isinstance(block, nn.Module) else originals[block]
    entries = [block.base, *block.others]
    nested = {i: build_block(entry, originals) for i, entry in enumerate(entries) if isinstance(entry, Merge)}
    parts = [nested.pop(i) if i in nested else build_block(entry, originals) for i, entry in enumerate(entries)]
    return MERGE_FUNCTIONS[block.kind](parts[0], parts[1:])


class _LaCoSearch(BlockStates):
    """The LaCo walk on a `BlockStates`, whose positions also hold merged blocks.

    On a model in memory an accepted merge is kept as its module. On a streamed checkpoint it is
    kept as its `Merge` recipe and rebuilt from the original blocks, read from disk, whenever it
    is run (a merged layer merged again nests recipes): memory holds at most the blocks of one
    merge and the merged block, never every merged block.
    """

    def __init__(self, source: BlockSource, ids: torch.Tensor, opts: LaCoOptions, threshold: float) -> None:
        super().__init__(source, ids, opts.batch_size)
        self.opts, self.threshold = opts, threshold
        self.keep_merged = source.keeps_blocks
        self.reference = self.final(self.states[-1])  # the original model's: never updated
        self.groups = [[i] for i in range(self.depth())]  # original blocks behind each current block
        self.steps: list[dict[str, Any]] = []  # the accepted merges: the plan's steps
        self.removed = 0

    def load(self, position: int) -> nn.Module:
        return build_block(self.blocks[position], self.originals)

    def walk(self, target: int) -> None:
        """Algorithm 1 from layer H - C down to L, stopping early once `target` blocks are removed."""
        opts = self.opts
        highest = self.depth() - 1 if opts.highest_layer < 0 else min(opts.highest_layer, self.depth() - 1)
        layer = highest - opts.merge_layers
        with tqdm(total=target, desc=f"laco T={self.threshold:.3g}", leave=False) as bar:
            while layer >= opts.lowest_layer and self.removed < target:
                count = min(opts.merge_layers - 1, self.depth() - layer - 1, target - self.removed)
                if count < 1:
                    layer -= 1
                    continue
                block, similarity = self._candidate(layer, count)
                if similarity <= self.threshold:
                    layer -= 1
                    continue
                self._accept(layer, count, block, similarity)
                bar.update(count)
                layer -= opts.interval
                if layer >= self.depth():
                    layer = self.depth() - 1 - opts.merge_layers

    def _candidate(self, start: int, count: int) -> tuple[Any, float]:
        """Positions start..start+count merged: the entry that stands for the merge, and its similarity."""
        recipe = Merge(self.blocks[start], tuple(self.blocks[start + 1 : start + 1 + count]), self.opts.merge)
        merged = build_block(recipe, self.originals)
        hidden = self.run(merged, self.states[start])
        block = merged if self.keep_merged else recipe  # streamed: dropped now, rebuilt when run again
        del merged
        hidden = self.run_from(start + 1 + count, hidden)
        return block, sequence_cosine(self.final(hidden), self.reference)

    def _accept(self, start: int, count: int, block: Any, similarity: float) -> None:
        group = [i for g in self.groups[start : start + 1 + count] for i in g]
        self.groups[start : start + 1 + count] = [group]
        self.steps.append({"position": start, "removes": count, "blocks": group, "score": similarity})
        self.removed += count
        self.replace(start, start + 1 + count, [block])
