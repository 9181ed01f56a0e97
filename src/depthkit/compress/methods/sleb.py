"""SLEB-style greedy block removal (Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy
Verification and Elimination of Transformer Blocks").

Each step removes the block whose removal raises the calibration loss (log-perplexity) least,
then re-measures on the shortened model: unlike ShortGPT, the choice accounts for blocks already
removed. Cost is kept down by caching the hidden states entering every block of the current
model (`BlockSearch`): the candidate "without block i" re-runs only the blocks after i, starting
from the cached input of block i, and after a removal only the states from i on are refreshed.
The search runs on the first `selection_blocks` calibration sequences (SLEB itself uses a small
calibration set too).

With `--offload disk` the same search runs on the checkpoint's files: every block is read when a
candidate needs it and dropped after use, so memory is one block plus the cached states of the
selection sequences. The price is reading: a step of an n-block model reads about n^2/2 blocks
(and the LM head for every candidate) where the model in memory reads none.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from depthkit.compress.base import register_method
from depthkit.compress.common import BlockSearch, BlockSource, SearchMethod, SearchOptions, selection_subset


@torch.no_grad()
def greedy_removal(search: BlockSearch, num_remove: int) -> tuple[list[int], list[float]]:
    """Remove `num_remove` blocks from `search`, cheapest first; their original indices in removal
    order and the calibration loss after each removal."""
    removed, losses = [], []
    for _step in tqdm(range(num_remove), desc="sleb", leave=False):
        candidates = [search.loss(search.run_from(i + 1, search.states[i])) for i in range(search.depth())]
        best = min(range(len(candidates)), key=candidates.__getitem__)
        removed.append(search.blocks[best])
        losses.append(candidates[best])
        # states[best] is still the input of the block now at position `best`; refresh the rest.
        search.replace(best, best + 1, [])
    return removed, losses


@register_method("sleb")
class SLEB(SearchMethod):
    description = "greedy: repeatedly remove the block whose removal raises calibration loss least"
    options_class = SearchOptions

    def search(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int
    ) -> tuple[BlockSearch, dict[str, Any]]:
        ids = selection_subset(calib_ids, self.settings.selection_blocks)
        search = BlockSearch(source, ids, self.settings.batch_size)
        removed, losses = greedy_removal(search, num_remove)
        return search, {
            "removed_blocks": sorted(removed),
            "removal_order": removed,
            "calibration_loss_after_each_step": losses,
            "selection_tokens": list(ids.shape),
        }
