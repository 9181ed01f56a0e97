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

Measured on SmolLM2-135M (30 blocks, `benchmarks/compare_methods.py`): RDSC merges of 3 layers keep a
last-layer cosine of only ~0.5, far below what dropping blocks keeps: in a small model the layers'
parameter differences are not small, so summing them is destructive. Note that with
`layers_per_merge=1` RDSC gives theta_l + (theta_{l+1} - theta_l) = theta_{l+1}: dropping block l.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import token_cosine
from depthkit.compress.base import CompressionMethod, CompressionOutcome, option, register_method
from depthkit.compress.common import (
    SearchOptions,
    calibration_context,
    capture_states,
    final_representation,
    refresh_states,
    run_layers,
    selection_subset,
)
from depthkit.errors import require
from depthkit.models.adapters import get_adapter


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
class LaCo(CompressionMethod):
    description = "LaCo layer collapse: merge runs of layers by adding parameter differences (RDSC)"
    options_class = LaCoOptions

    @torch.no_grad()
    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        opts = self.settings
        per_merge, threshold, relax = opts.layers_per_merge, opts.threshold, opts.relax
        interval, lowest = opts.interval, opts.lowest_layer
        search = _Search(model, selection_subset(calib_ids, opts.selection_blocks), opts.batch_size)
        require(lowest + num_remove < search.depth(),
                f"laco cannot remove {num_remove} blocks above lowest_layer {lowest} of {search.depth()}")
        thresholds = []
        with tqdm(total=num_remove, desc="laco", leave=False) as bar:
            while search.removed < num_remove:
                thresholds.append(threshold)
                best_rejected = search.sweep(threshold, per_merge, interval, lowest, num_remove, bar)
                search.remerge = search.remerge or best_rejected == float("-inf")
                threshold = min(threshold - relax, best_rejected)
        return CompressionOutcome({
            "merges": search.merges,
            "removed_blocks": sorted(i for group in search.groups for i in group[1:]),
            "merged_groups": [group for group in search.groups if len(group) > 1],
            "thresholds": thresholds,
            "selection_tokens": list(search.ids.shape),
        })


class _Search:
    """The LaCo walk over one model, with cached per-block hidden states of the current model."""

    def __init__(self, model: PreTrainedModel, ids: torch.Tensor, batch_size: int) -> None:
        self.model, self.ids, self.batch_size = model, ids, batch_size
        self.adapter = get_adapter(model)
        self.context = calibration_context(model, ids, batch_size)
        self.states = capture_states(model, ids, batch_size)
        self.reference = final_representation(model, self.states[-1])
        self.groups = [[i] for i in range(self.depth())]  # original blocks behind each current block
        self.merges: list[dict] = []
        self.removed = 0
        self.remerge = False  # allowed only once no group of unmerged layers is left to try

    def depth(self) -> int:
        return len(self.adapter.layers(self.model))

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
            layers = list(self.adapter.layers(self.model))
            merged = rdsc_merge(layers[start], layers[start + 1 : start + 1 + count])
            hidden = run_layers(self.model, [merged, *layers[start + 1 + count :]], self.states[start],
                                self.batch_size, self.context)
            similarity = float(token_cosine(final_representation(self.model, hidden), self.reference).mean())
            if similarity < threshold:
                best_rejected = max(best_rejected, similarity)
                start -= 1
                continue
            self._accept(start, count, merged, layers, similarity, threshold)
            bar.update(count)
            start = min(start - interval - per_merge, self.depth() - 1 - per_merge)
        return best_rejected

    def _accept(self, start: int, count: int, merged: nn.Module, layers: list[nn.Module], similarity: float,
                threshold: float) -> None:
        self.adapter.set_layers(self.model, [*layers[:start], merged, *layers[start + 1 + count :]])
        group = [i for g in self.groups[start : start + 1 + count] for i in g]
        self.groups[start : start + 1 + count] = [group]
        self.merges.append({"blocks": group, "similarity": similarity, "threshold": threshold})
        self.removed += count
        self.states = refresh_states(self.model, self.states, start, self.batch_size, self.context)
        self.reference = final_representation(self.model, self.states[-1])
