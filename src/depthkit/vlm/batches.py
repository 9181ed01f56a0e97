"""Batches of tokenised VQA examples with their cached visual features."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from depthkit.vlm.data import VQADataset, VQAExample
from depthkit.vlm.model import EncodedExample, VisionLanguageModel, VLMBatch, collate


class VQABatches:
    """One split, tokenised once; iterate shuffled training batches or ordered evaluation batches."""

    def __init__(self, vlm: VisionLanguageModel, dataset: VQADataset, split: str,
                 features: dict[str, torch.Tensor], limit: int | None = None, seed: int = 0) -> None:
        examples = dataset.split(split)
        if limit is not None and limit < len(examples):
            # a seeded sample, not the first N: the split is ordered by source (MNIST first)
            keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
            examples = [examples[i] for i in keep]
        self.examples: list[VQAExample] = examples
        self.encoded: list[EncodedExample] = [vlm.encode(e.question, e.answer) for e in self.examples]
        self.features = features
        self.pad_id = vlm.pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int] | np.ndarray) -> VLMBatch:
        return collate([self.encoded[i] for i in indices],
                       [self.features[self.examples[i].image] for i in indices], self.pad_id)

    def in_order(self, batch_size: int) -> Iterator[tuple[list[int], VLMBatch]]:
        for start in range(0, len(self), batch_size):
            indices = list(range(start, min(start + batch_size, len(self))))
            yield indices, self.batch(indices)

    def shuffled(self, batch_size: int, steps: int, seed: int) -> Iterator[VLMBatch]:
        """`steps` batches drawn epoch by epoch in a seeded random order (the same for every variant)."""
        rng = np.random.default_rng(seed)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < batch_size:
                order += rng.permutation(len(self)).tolist()
            indices, order = order[:batch_size], order[batch_size:]
            yield self.batch(indices)
