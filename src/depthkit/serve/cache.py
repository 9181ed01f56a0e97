"""A per-sequence ("per-slot") KV cache for continuous batching, and the masks that go with it.

Every running sequence owns one ROW of a preallocated tensor per K and V, shaped
`(cache slots, rows, kv heads, capacity, head dim)`; a cache slot is one application of a layer
(`RecursiveModel.slot`: one per layer for a plain model, one per layer and loop step for a looped
one). Rows have different lengths, so a batched step passes each row's position, writes each
row's new keys at its own position and masks what lies beyond it. A finished sequence frees its
row at once and the next request takes it: no copying, no fragmentation, memory fixed at start-up
(`rows x capacity` tokens), which is what a small server on a CPU or one GPU wants. A paged cache
would share memory between short and long sequences; with a few dozen rows it is not needed.

For depth-wise batching the rows of one call may be at different loop steps: `offsets` shifts
each row's slot (`step x slots per step`), so one pass of the shared block reads and writes the
right step's keys for every row.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Keys and values of every sequence in its own row; duck-types the `update` of a transformers
    `Cache`, which is all an attention layer calls."""

    def __init__(self, num_slots: int, rows: int, capacity: int):
        self.num_slots, self.rows, self.capacity = num_slots, rows, capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._rows = torch.zeros(0, dtype=torch.long)
        self._starts = torch.zeros(0, dtype=torch.long)
        self._offsets = torch.zeros(0, dtype=torch.long)

    def bind(self, rows: list[int], starts: list[int], offsets: list[int] | None = None) -> None:
        """The rows the next layer calls are for, the position of each row's first new token and
        each row's slot offset (0 unless rows are at different loop steps)."""
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._starts = torch.tensor(starts, dtype=torch.long)
        self._offsets = torch.tensor(offsets if offsets is not None else [0] * len(rows), dtype=torch.long)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of the bound rows in slot `layer_idx` (+ offsets) and return
        each row's keys/values up to the longest row (positions beyond a row are masked)."""
        if self.keys is None:
            self._allocate(key)
        slots, rows, starts = self._offsets + layer_idx, self._rows, self._starts
        length = key.shape[2]
        if length == 1:
            self.keys[slots, rows, :, starts] = key[:, :, 0]
            self.values[slots, rows, :, starts] = value[:, :, 0]
        else:  # a prompt: one row at a time
            start = int(starts[0])
            self.keys[slots[0], rows[0], :, start:start + length] = key[0]
            self.values[slots[0], rows[0], :, start:start + length] = value[0]
        end = int(starts.max()) + length
        return self.keys[slots, rows, :, :end], self.values[slots, rows, :, :end]

    def _allocate(self, key: torch.Tensor) -> None:
        shape = (self.num_slots, self.rows, key.shape[1], self.capacity, key.shape[3])
        self.keys = torch.zeros(shape, dtype=key.dtype, device=key.device)
        self.values = torch.zeros_like(self.keys)

    def copy_position(self, row: int, position: int, sources: list[int], targets: list[int]) -> None:
        """Give slots `targets` the keys/values of slots `sources` at one position of one row: an
        early-exited token's skipped loop steps reuse its last computed step (Huginn's KV reuse)."""
        if self.keys is None:
            return
        self.keys[targets, row, :, position] = self.keys[sources, row, :, position]
        self.values[targets, row, :, position] = self.values[sources, row, :, position]

    def memory_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


def attention_masks(positions: torch.Tensor, length: int, sliding_window: int | None, eager: bool,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Causal masks `(rows, 1, queries, length)` per attention type for queries at absolute
    `positions` `(rows, queries)`: a key is visible if it is not after the query (and, for
    sliding-window layers, within the window). Eager attention adds the mask, so it gets 0 / -inf
    floats; SDPA takes booleans."""
    keys = torch.arange(length, device=positions.device).view(1, 1, -1)
    visible = keys <= positions.unsqueeze(-1)
    masks = {"full_attention": visible}
    if sliding_window:
        masks["sliding_attention"] = visible & (keys > positions.unsqueeze(-1) - sliding_window)
    if eager:
        low = torch.finfo(dtype).min
        masks = {kind: torch.zeros(m.shape, dtype=dtype).masked_fill(~m, low) for kind, m in masks.items()}
    return {kind: m.unsqueeze(1) for kind, m in masks.items()}
