"""Perplexity over fixed or sliding windows of a token stream.

Fixed windows (stride == window) score every token of each window but the first. Sliding
windows (stride < window) give each scored token `window - stride` tokens of extra context: a
window scores only its last `stride` tokens (the first window scores all of them), as in the
Hugging Face perplexity guide. Tokens after the last full window are not scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.errors import DepthkitError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    window: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_starts(num_tokens: int, window: int, stride: int) -> list[int]:
    if window < 2:
        raise DepthkitError(f"window must be at least 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise DepthkitError(f"stride must be in 1..window ({window}), got {stride}")
    if num_tokens < window:
        raise DepthkitError(f"text too short: {num_tokens} tokens is less than one window of {window}")
    return list(range(0, num_tokens - window + 1, stride))


def window_labels(ids: torch.Tensor, start: int, window: int, stride: int) -> torch.Tensor:
    """Labels of one window: context tokens that an earlier window already scored are -100."""
    labels = ids.clone()
    if start > 0:
        labels[: window - stride] = -100
    return labels


DEFAULT_WINDOW = 1024


def default_window(model: PreTrainedModel) -> int:
    """`DEFAULT_WINDOW` tokens, or the model's whole context where it is shorter (a tiny model's 512)."""
    limit = getattr(getattr(model, "module", model).config, "max_position_embeddings", None)
    return min(DEFAULT_WINDOW, limit) if limit else DEFAULT_WINDOW


def check_context(model: PreTrainedModel, window: int) -> None:
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in `.module`
    limit = getattr(inner.config, "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise DepthkitError(f"window {window} is larger than the model's context ({limit} tokens)")


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    stream: torch.Tensor,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
    prefix: list[int] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream (optionally its first `max_tokens` tokens).

    `prefix` (the tokenizer's `sequence_prefix`, e.g. Gemma's BOS) starts every window and is never
    scored; the window then holds `window - len(prefix)` tokens of the stream.
    """
    stride = stride or window
    check_context(model, window)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if prefix:
        head = torch.tensor(prefix, dtype=stream.dtype)
        body = window - len(prefix)
        stream_windows = perplexity_windows(stream, body, min(stride, body))
        return _score(model, [(torch.cat([head, ids]), torch.cat([torch.full_like(head, -100), labels]))
                              for ids, labels in stream_windows], window, stride, batch_size, progress)
    return _score(model, perplexity_windows(stream, window, stride), window, stride, batch_size, progress)


def perplexity_windows(stream: torch.Tensor, window: int, stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of every window over `stream`."""
    return [(stream[s: s + window], window_labels(stream[s: s + window], s, window, stride))
            for s in window_starts(stream.numel(), window, stride)]


def _score(model: PreTrainedModel, windows: list[tuple[torch.Tensor, torch.Tensor]], window: int, stride: int,
           batch_size: int, progress: bool) -> PerplexityResult:
    """Summed NLL over (ids, labels) windows, `batch_size` windows per forward."""
    device = next(model.parameters()).device
    total_nll, total_count, began = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        ids = torch.stack([ids for ids, _ in batch]).to(device)
        labels = torch.stack([labels for _, labels in batch])
        logits = model(input_ids=ids).logits.float()
        nll, count = sequence_nll(logits, labels.to(device))
        total_nll += nll
        total_count += count
        bar.update(len(batch))
    bar.close()
    mean = total_nll / total_count
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, tokens_scored=total_count, windows=len(windows),
        window=window, stride=stride, seconds=time.perf_counter() - began,
    )


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of scored tokens."""
    shifted = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss.item(), int((shifted != -100).sum())
