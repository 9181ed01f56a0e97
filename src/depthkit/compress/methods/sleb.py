"""SLEB-style greedy block removal (Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy
Verification and Elimination of Transformer Blocks").

Each step removes the block whose removal raises the calibration loss (log-perplexity) least,
then re-measures on the shortened model: unlike ShortGPT, the choice accounts for blocks already
removed. Cost is kept down by caching the hidden states entering every block of the current
model (`BlockStates`): the candidate "without block i" re-runs only the blocks after i, starting
from the cached input of block i, and after a removal only the states from i on are refreshed.
The search runs on the first `selection_blocks` calibration sequences (SLEB itself uses a small
calibration set too). As in the authors' search, the first and the last block are never candidates
(`allow_ends` lets them be); on SmolLM2-135M the search never chose them anyway.

With `--offload disk` the same search runs on the checkpoint's files: every block is read when a
candidate needs it and dropped after use, so memory is one block plus the cached states of the
selection sequences. The price is reading: a step of an n-block model reads about n^2/2 blocks
(and the LM head for every candidate) where the model in memory reads none.

Plan: the removed blocks in removal order, each with the calibration loss after its removal
(`reuse` "prefix"). A search for fewer blocks makes the same first steps (every step depends only
on the blocks removed before it) and stops earlier, so the first k' of a plan searched for k are
exactly a fresh search for k' <= k; a larger count needs a longer search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthkit.compress.base import CompressionMethod, CompressionOutcome, option, register_method
from depthkit.compress.common import SearchOptions, selection_subset
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import require
from depthkit.models.runner import BlockSink, BlockSource, BlockStates


@torch.no_grad()
def greedy_removal(search: BlockStates, num_remove: int, allow_ends: bool = False) -> tuple[list[int], list[float]]:
    """Remove `num_remove` blocks from `search`, cheapest first; their original indices in removal
    order and the calibration loss after each removal. Unless `allow_ends`, the first and the last
    block stay (they are never candidates, as in the authors' search)."""
    removed, losses = [], []
    for _step in tqdm(range(num_remove), desc="sleb", leave=False):
        margin = 0 if allow_ends else 1
        positions = range(margin, search.depth() - margin)
        candidates = {i: search.loss(search.run_from(i + 1, search.states[i])) for i in positions}
        best = min(candidates, key=candidates.__getitem__)
        removed.append(search.blocks[best])
        losses.append(candidates[best])
        # states[best] is still the input of the block now at position `best`; refresh the rest.
        search.replace(best, best + 1, [])
    return removed, losses


@dataclass
class SLEBOptions(SearchOptions):
    allow_ends: bool = option(False, "let the first and last blocks be removed (the authors' search never "
                                     "considers them; default false)")


@register_method("sleb")
class SLEB(CompressionMethod):
    description = "greedy: repeatedly remove the block whose removal raises calibration loss least"
    options_class = SLEBOptions
    step_keys = ("block", "removes", "score")
    paper = ("Song et al., 2024, SLEB: Streamlining LLMs through Redundancy Verification and Elimination of "
             "Transformer Blocks (ICML 2024)")

    def deviations(self) -> list[str]:
        found = [
            "calibration: the authors search with 128 random windows of 2048 tokens of WikiText-2 train (seed 0); "
            f"here the first {self.settings.selection_blocks} sequences of the calibration set (card: calibration), "
            "for speed: set `selection_blocks` and the calibration size to match",
            "the loss is computed from hidden states cached at each block's input (same numbers as re-running the "
            "model, minus floating-point reordering)",
        ]
        if self.settings.allow_ends:
            found.append("`allow_ends`: the first and last blocks were candidates (the authors exclude them)")
        return found

    @torch.no_grad()
    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        ids = selection_subset(calib_ids, self.settings.selection_blocks)
        search = BlockStates(source, ids, self.settings.batch_size)
        require(num_remove <= search.depth() - (0 if self.settings.allow_ends else 2),
                f"sleb keeps the first and last of {search.depth()} blocks, so it cannot remove {num_remove} "
                "(option allow_ends=true lets it)")
        removed, losses = greedy_removal(search, num_remove, self.settings.allow_ends)
        steps = [{"block": block, "removes": 1, "score": loss} for block, loss in zip(removed, losses)]
        return self.new_plan(source, num_remove, "prefix", steps, {"selection_tokens": list(ids.shape)})

    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """The blocks of the plan's first `num_remove` steps go; the others are written in order."""
        steps = plan.steps[: plan.steps_for(num_remove)]
        removed = [step["block"] for step in steps]
        layers = source.layers()
        for new_index, old_index in enumerate(i for i in range(len(layers)) if i not in removed):
            sink.write_layer(new_index, layers[old_index])
        return CompressionOutcome({
            "removed_blocks": sorted(removed),
            "removal_order": removed,
            "calibration_loss_after_each_step": [step["score"] for step in steps],
            "selection_tokens": plan.details.get("selection_tokens"),
        })
