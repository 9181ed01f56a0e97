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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from depthkit.compress.base import option, register_method
from depthkit.compress.common import SearchMethod, SearchOptions, selection_subset
from depthkit.errors import require
from depthkit.models.runner import BlockSource, BlockStates


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
class SLEB(SearchMethod):
    description = "greedy: repeatedly remove the block whose removal raises calibration loss least"
    options_class = SLEBOptions
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

    def search(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int
    ) -> tuple[BlockStates, dict[str, Any]]:
        ids = selection_subset(calib_ids, self.settings.selection_blocks)
        search = BlockStates(source, ids, self.settings.batch_size)
        require(num_remove <= search.depth() - (0 if self.settings.allow_ends else 2),
                f"sleb keeps the first and last of {search.depth()} blocks, so it cannot remove {num_remove} "
                "(option allow_ends=true lets it)")
        removed, losses = greedy_removal(search, num_remove, self.settings.allow_ends)
        return search, {
            "removed_blocks": sorted(removed),
            "removal_order": removed,
            "calibration_loss_after_each_step": losses,
            "selection_tokens": list(ids.shape),
        }
