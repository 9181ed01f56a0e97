"""A per-sequence ("per-slot") KV cache for continuous batching, and the masks that go with it.

Every running sequence owns one ROW of a preallocated tensor per K and V, shaped
`(cache slots, rows, kv heads, capacity, head dim)`; a cache slot is one application of a layer
(`RecursiveModel.slot`: one per layer for a plain model, one per layer and loop step for a looped
one). Rows have different lengths, so a batched step passes each row's position, writes each
row's new keys at its own position and masks what lies beyond it. A finished sequence frees its
row at once and the next request takes it: no fragmentation, memory fixed at start-up
(`rows x capacity` tokens), which is what a small server on a CPU or one GPU wants. A paged cache
would share memory between short and long sequences; with a few dozen rows it is not needed.

The engine keeps its running sequences in the leading rows (a finished sequence's row is taken by
the last one), so a batch reads its keys as a slice of the cache rather than a gather.

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
        self._pads: list[int] | None = None

    def bind_prompts(self, rows: list[int], pads: list[int]) -> None:
        """The next layer calls prefill these rows with prompts left-padded by `pads` tokens."""
        self.bind(rows, [0] * len(rows))
        self._pads = pads

    def bind(self, rows: list[int], starts: list[int], offsets: list[int] | None = None) -> None:
        """The rows the next layer calls are for, the position of each row's first new token and
        each row's slot offset (0 unless rows are at different loop steps)."""
        self._pads = None
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._starts = torch.tensor(starts, dtype=torch.long)
        self._offsets = torch.tensor(offsets if offsets is not None else [0] * len(rows), dtype=torch.long)
        # Rows 0..n-1 in order at one slot offset (what a compact engine binds): read a slice, not a gather.
        self._leading = rows == list(range(len(rows))) and len(set(offsets or [0])) == 1

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of the bound rows in slot `layer_idx` (+ offsets) and return
        each row's keys/values up to the longest row (positions beyond a row are masked)."""
        if self.keys is None:
            self._allocate(key)
        slots, rows, starts = self._offsets + layer_idx, self._rows, self._starts
        if self._pads is not None:  # prompts: store each one's real tokens; attend within the batch
            for index, (row, pad) in enumerate(zip(rows.tolist(), self._pads)):
                self.keys[slots[index], row, :, :key.shape[2] - pad] = key[index, :, pad:]
                self.values[slots[index], row, :, :key.shape[2] - pad] = value[index, :, pad:]
            return key, value
        self.keys[slots, rows, :, starts] = key[:, :, 0]
        self.values[slots, rows, :, starts] = value[:, :, 0]
        length = key.shape[2]
        end = int(starts.max()) + length
        if self._leading:
            slot, count = int(slots[0]), len(rows)
            return self.keys[slot, :count, :, :end], self.values[slot, :count, :, :end]
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

    def move_row(self, source: int, target: int) -> None:
        """Give row `target` everything row `source` holds (the engine keeps its running rows leading)."""
        if self.keys is not None:
            self.keys[:, target] = self.keys[:, source]
            self.values[:, target] = self.values[:, source]

    def memory_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


def attention_masks(positions: torch.Tensor, length: int, sliding_window: int | None, eager: bool,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Causal masks `(rows, 1, queries, length)` per attention type for queries at absolute
    `positions` `(rows, queries)` over the cached keys 0..length-1: a key is visible if it is not
    after the query (and, for sliding-window layers, within the window)."""
    keys = torch.arange(length, device=positions.device).view(1, 1, -1)
    queries = positions.unsqueeze(-1)
    visible = {"full_attention": keys <= queries}
    if sliding_window:
        visible["sliding_attention"] = visible["full_attention"] & (keys > queries - sliding_window)
    return as_masks(visible, eager, dtype)


def prompt_masks(positions: torch.Tensor, pads: torch.Tensor, sliding_window: int | None, eager: bool,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Masks `(rows, 1, q, q)` for prompts left-padded to one length q: a real token sees the real
    tokens up to itself (within the window); a padding position sees only itself, so no row of the
    attention is empty (which would give NaN)."""
    index = torch.arange(positions.shape[1], device=positions.device)
    real = (index.unsqueeze(0) >= pads.unsqueeze(1)).unsqueeze(1)  # (rows, 1, keys)
    itself = (index.view(-1, 1) == index.view(1, -1)).unsqueeze(0)
    causal = (index.view(1, -1) <= index.view(-1, 1)).unsqueeze(0) & real
    visible = {"full_attention": causal | itself}
    if sliding_window:
        near = positions.unsqueeze(1) > positions.unsqueeze(2) - sliding_window
        visible["sliding_attention"] = (causal & near) | itself
    return as_masks(visible, eager, dtype)


def as_masks(visible: dict[str, torch.Tensor], eager: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Boolean visibility `(rows, queries, keys)` as attention masks `(rows, 1, queries, keys)`: eager
    attention adds its mask, so it gets 0 / -inf floats; SDPA takes booleans."""
    if eager:
        low = torch.finfo(dtype).min
        visible = {kind: torch.zeros(v.shape, dtype=dtype).masked_fill(~v, low) for kind, v in visible.items()}
    return {kind: v.unsqueeze(1) for kind, v in visible.items()}
