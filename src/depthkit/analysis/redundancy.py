"""Redundancy analysis of a model's depth on calibration tokens.

Hidden states are produced block by block (`depthkit.models.runner`): only the current block's
input and output exist in full at any time, and only its weights when the model is a
`StreamingModel` read from disk. What is kept across blocks is small: for CKA and
angular distances, a fixed random sample of token positions per layer (`sample_tokens`).

The first position of every sequence is left out of that sample by default: LLaMA-family models
park a "massive activation" there (norm ~100x the others in SmolLM2), which would otherwise
dominate CKA and hide the structure of every other token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import angular_distance, block_influence, cka_matrix
from depthkit.models.runner import BlockSource, as_source, iterate_blocks

MAX_SPAN = 4


@dataclass
class RedundancyReport:
    num_layers: int
    tokens: int
    sampled_tokens: int
    block_influence: list[float]
    angular_distance: dict[int, list[float]]  # span n -> distance between layer l and l+n, l=0..L-n
    cka: list[list[float]]  # (L+1) x (L+1): hidden state 0 is the embedding output

    def to_dict(self) -> dict:
        return asdict(self)

    def lowest_influence(self, k: int) -> list[int]:
        """The k blocks with the lowest block influence (ShortGPT's removal order)."""
        order = sorted(range(self.num_layers), key=lambda i: self.block_influence[i])
        return sorted(order[:k])


@torch.no_grad()
def analyze_redundancy(
    model: PreTrainedModel | BlockSource,
    input_ids: torch.Tensor,
    sample_tokens: int = 2048,
    batch_size: int = 8,
    seed: int = 0,
    skip_first: int = 1,
    progress: bool = True,
) -> RedundancyReport:
    """Block influence, angular distance for spans 1..4 and the CKA matrix on `input_ids`.

    Block influence averages over every token; CKA and angular distances use `sample_tokens`
    random positions that are not among the first `skip_first` of their sequence.
    """
    source = as_source(model)
    num_layers = len(source.layers())
    batch, length = input_ids.shape
    eligible = (torch.arange(batch)[:, None] * length + torch.arange(skip_first, length)[None, :]).flatten()
    generator = torch.Generator().manual_seed(seed)
    sample = eligible[torch.randperm(eligible.numel(), generator=generator)[:sample_tokens]]
    states: list[torch.Tensor] = []
    influence: list[float] = []
    blocks = iterate_blocks(source, input_ids, batch_size)
    for _index, block_in, block_out in tqdm(blocks, total=num_layers, desc="analyze", disable=not progress):
        if not states:
            states.append(_sampled(block_in, sample))
        states.append(_sampled(block_out, sample))
        influence.append(block_influence(block_in, block_out))
    spans = {
        n: [angular_distance(states[i], states[i + n]) for i in range(num_layers - n + 1)]
        for n in range(1, min(MAX_SPAN, num_layers) + 1)
    }
    return RedundancyReport(
        num_layers=num_layers, tokens=input_ids.numel(), sampled_tokens=len(sample),
        block_influence=influence, angular_distance=spans, cka=cka_matrix(states).tolist(),
    )


def _sampled(hidden: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])[sample].float().clone()
