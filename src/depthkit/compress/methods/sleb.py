"""SLEB-style greedy block removal (Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy
Verification and Elimination of Transformer Blocks").

Each step removes the block whose removal raises the calibration loss (log-perplexity) least,
then re-measures on the shortened model: unlike ShortGPT, the choice accounts for blocks already
removed. Cost is kept down by caching the hidden states entering every block of the current
model: the candidate "without block i" re-runs only the blocks after i, starting from the cached
input of block i, and after a removal only the states from i on are refreshed. The search runs on
the first `selection_blocks` calibration sequences (SLEB itself uses a small calibration set too).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import (
    SearchOptions,
    calibration_context,
    capture_states,
    lm_loss,
    refresh_states,
    remove_blocks,
    run_layers,
    selection_subset,
)
from depthkit.models.adapters import get_adapter


@register_method("sleb")
class SLEB(CompressionMethod):
    description = "greedy: repeatedly remove the block whose removal raises calibration loss least"
    options_class = SearchOptions

    @torch.no_grad()
    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        ids = selection_subset(calib_ids, self.settings.selection_blocks)
        batch_size = self.settings.batch_size
        context = calibration_context(model, ids, batch_size)
        original = list(range(len(get_adapter(model).layers(model))))  # original index of each current block
        states = capture_states(model, ids, batch_size)
        removed, losses = [], []
        for _step in tqdm(range(num_remove), desc="sleb", leave=False):
            layers = list(get_adapter(model).layers(model))
            candidates = [lm_loss(model, run_layers(model, layers[i + 1 :], states[i], batch_size, context), ids)
                          for i in range(len(layers))]
            best = min(range(len(layers)), key=candidates.__getitem__)
            remove_blocks(model, [best])
            removed.append(original.pop(best))
            losses.append(candidates[best])
            # states[best] is still the input of the block now at position `best`; refresh the rest.
            states = refresh_states(model, states, best, batch_size, context)
        return CompressionOutcome({
            "removed_blocks": sorted(removed),
            "removal_order": removed,
            "calibration_loss_after_each_step": losses,
            "selection_tokens": list(ids.shape),
        })

