"""Token streams and fixed-length token blocks for calibration, training and evaluation.

Splits never overlap: every document is cut once at `HELDOUT_FRACTION` from its end (on a line
boundary); the part before the cut is `calib` (calibration and fine-tuning), the part after it is
`heldout` (evaluation). `all` is the whole text, for when the user picks their own slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from depthkit.data.corpora import Document, load_documents, mixture_components
from depthkit.errors import DepthkitError, require

SPLITS = ("calib", "heldout", "all")
HELDOUT_FRACTION = 0.2


def split_text(text: str, split: str) -> str:
    """The `split` part of one document's text (see the module docstring)."""
    if split not in SPLITS:
        raise DepthkitError(f"unknown split '{split}'; choose from {', '.join(SPLITS)}")
    if split == "all":
        return text
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut] if split == "calib" else text[cut:]


@dataclass(frozen=True)
class DataSpec:
    """A corpus, a split, and how many tokens to skip at the start (to take a later slice)."""

    corpus: str
    split: str = "calib"
    offset: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DepthkitError(f"unknown split '{self.split}'; choose from {', '.join(SPLITS)}")
        if self.offset < 0:
            raise DepthkitError(f"a token offset must be >= 0, got {self.offset}")

    def describe(self) -> str:
        return f"{self.corpus} [{self.split}" + (f", from token {self.offset}]" if self.offset else "]")


def split_documents(corpus: str, split: str) -> list[Document]:
    """The `split` part of every document of `corpus` (a mixture: of every component's)."""
    return [Document(doc.name, split_text(doc.text, split)) for doc in load_documents(corpus)]


def token_stream(tokenizer: PreTrainedTokenizerBase, spec: DataSpec) -> torch.Tensor:
    """All tokens of the split, documents concatenated (each separated by the EOS token)."""
    ids: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in split_documents(spec.corpus, spec.split):
        if ids:
            ids += separator
        ids += document_ids(tokenizer, doc)
    return torch.tensor(ids[spec.offset :], dtype=torch.long)


def document_ids(tokenizer: PreTrainedTokenizerBase, doc: Document) -> list[int]:
    return tokenizer(doc.text, add_special_tokens=False)["input_ids"]


def sequence_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma's BOS; nothing for SmolLM2).

    Corpora are tokenized without special tokens so that blocks can be cut anywhere; every block
    (and every perplexity window) then starts the way the model saw its training sequences start.
    """
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return full[: len(full) - len(probe)] if full[len(full) - len(probe):] == probe else []


def starts_like_a_text(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Make a block builder `(tokenizer, spec, num_blocks, block_len)` start every block with
    `sequence_prefix`, keeping `block_len` tokens in all."""

    @functools.wraps(build)
    def wrapper(tokenizer: PreTrainedTokenizerBase, spec: DataSpec, num_blocks: int, block_len: int) -> torch.Tensor:
        prefix = sequence_prefix(tokenizer)
        if not prefix:
            return build(tokenizer, spec, num_blocks, block_len)
        check_block_shape(num_blocks, block_len - len(prefix))
        body = build(tokenizer, spec, num_blocks, block_len - len(prefix))
        return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(body.shape[0], -1), body], dim=1)

    return wrapper


def check_block_shape(num_blocks: int, block_len: int) -> None:
    if num_blocks < 1 or block_len < 2:
        raise DepthkitError(f"need at least 1 block of 2 tokens, got {num_blocks} x {block_len}")


@starts_like_a_text
def interleaved_blocks(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, num_blocks: int, block_len: int
) -> torch.Tensor:
    """`num_blocks` blocks of `block_len` tokens taken in turn from the corpus' documents
    (document 1's first block, document 2's first block, ...), shape (n, len).

    `token_blocks` takes the first tokens of the concatenated split, so a few hundred blocks of a
    six-novel corpus are all the first novel; training on them and evaluating on another novel
    measures transfer between books as much as the model. Here every prefix of the result covers
    every document. A document too short for its turn drops out and the others make up its share,
    so a corpus of uneven documents (Python's modules, a manual's short parts) still gives the
    blocks it holds. A mixture (`mix`, `austen+pydoc`) gives each component an equal share, also
    in turn, so a component of many small documents does not outweigh one of six novels.
    `spec.offset` skips tokens at the start of each document.
    """
    check_block_shape(num_blocks, block_len)
    components = mixture_components(spec.corpus)
    per_component = [
        _document_turns(tokenizer, DataSpec(component, spec.split, spec.offset), share, block_len)
        for component, share in zip(components, _equal_shares(num_blocks, len(components))) if share
    ]
    return torch.stack(_in_turn(per_component))


def _document_turns(tokenizer: PreTrainedTokenizerBase, spec: DataSpec, count: int, block_len: int
                    ) -> list[torch.Tensor]:
    """`count` blocks taken in turn from the documents that still have a whole block left."""
    documents = split_documents(spec.corpus, spec.split)
    per_document = []
    for doc in documents:
        ids = document_ids(tokenizer, doc)[spec.offset :]
        whole = len(ids) // block_len * block_len
        per_document.append(list(torch.tensor(ids[:whole], dtype=torch.long).view(-1, block_len)))
    blocks = _in_turn(per_document)
    if len(blocks) < count:
        shortest = min(documents, key=lambda doc: len(doc.text))
        raise DepthkitError(
            f"text too short: asked for {count} x {block_len} tokens from {spec.describe()}, but its documents "
            f"hold {len(blocks)} whole blocks (the shortest: '{shortest.name}')"
        )
    return blocks[:count]


def _equal_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` shares that differ by at most one, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _in_turn(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The groups' items taken in turn (each group's first, then each group's second, ...); a group
    that runs out drops out."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]


@starts_like_a_text
def token_blocks(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, num_blocks: int, block_len: int
) -> torch.Tensor:
    """`num_blocks` consecutive, non-overlapping blocks of `block_len` tokens, shape (n, len).

    Too little text is an error naming how much was asked and how much there is, never a silent
    shorter calibration set.
    """
    check_block_shape(num_blocks, block_len)
    stream = token_stream(tokenizer, spec)
    needed = num_blocks * block_len
    if stream.numel() < needed:
        raise DepthkitError(
            f"text too short: asked for {num_blocks} x {block_len} = {needed} tokens, "
            f"but {spec.describe()} has {stream.numel()}"
        )
    return stream[:needed].view(num_blocks, block_len)


@starts_like_a_text
def sample_blocks(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, num_blocks: int, block_len: int
) -> torch.Tensor:
    """`num_blocks` non-overlapping blocks of `block_len` tokens spread over ALL of the split, shape (n, len).

    What calibration should represent is the whole text, not its opening pages (`token_blocks`
    takes the first tokens, so a six-novel corpus calibrates on the first novel alone). A mixture
    (`austen+pydoc`, `mix`) gives each component an equal share, taken in turn (component 1's
    first block, component 2's first block, ...); within a component the blocks start at evenly
    spaced places of its documents joined in order, so each document contributes in proportion to
    its length. Blocks are ordered so that every prefix is spread too (a search that uses the
    first 8 sequences sees every component and every part of each). `spec.offset` is not
    supported here: sampling already covers the text.
    """
    check_block_shape(num_blocks, block_len)
    require(spec.offset == 0, "an offset applies to consecutive blocks, not to blocks sampled over the whole text")
    components = mixture_components(spec.corpus)
    per_component = [
        list(_spread_blocks(tokenizer, DataSpec(component, spec.split), share, block_len))
        for component, share in zip(components, _equal_shares(num_blocks, len(components))) if share
    ]
    return torch.stack(_in_turn(per_component))


def _spread_blocks(tokenizer: PreTrainedTokenizerBase, spec: DataSpec, count: int, block_len: int) -> torch.Tensor:
    """`count` blocks starting at evenly spaced line starts of the split's documents joined by blank
    lines, in low-discrepancy order. Only the text of each block is tokenized (a 20 MB manual is
    not tokenized whole to take 16 blocks of it)."""
    text = "\n\n".join(doc.text for doc in split_documents(spec.corpus, spec.split) if doc.text.strip())
    spacing = len(text) / count
    starts = [_line_start(text, int(k * spacing)) for k in range(count)]
    blocks = []
    for k, start in enumerate(starts):
        limit = starts[k + 1] if k + 1 < count else len(text)  # blocks never overlap: each ends before the next
        ids = _tokens_from(tokenizer, text, start, limit, block_len)
        if ids is None:
            raise DepthkitError(
                f"text too short: asked for {count} x {block_len} tokens spread over {spec.describe()}, but its "
                f"{len(text):,} characters give fewer than {block_len} tokens between two evenly spaced starts; "
                "ask for fewer or shorter blocks"
            )
        blocks.append(ids)
    return torch.stack([blocks[k] for k in _low_discrepancy_order(count)])


def _line_start(text: str, position: int) -> int:
    """The first line start at or after `position` (the position itself if no line starts later)."""
    if position == 0:
        return 0
    newline = text.find("\n", position - 1)
    return newline + 1 if 0 <= newline < len(text) - 1 else position


def _tokens_from(
    tokenizer: PreTrainedTokenizerBase, text: str, start: int, limit: int, block_len: int
) -> torch.Tensor | None:
    """The first `block_len` tokens of `text[start:limit]` (None if it has fewer). The slice grows
    until it holds more than `block_len` tokens, so the last one kept is never a cut word."""
    span = 8 * block_len
    while True:
        stop = min(start + span, limit)
        ids = tokenizer(text[start:stop], add_special_tokens=False)["input_ids"]
        if len(ids) > block_len or (stop == limit and len(ids) == block_len):
            return torch.tensor(ids[:block_len], dtype=torch.long)
        if stop == limit:
            return None
        span *= 2


def _low_discrepancy_order(count: int) -> list[int]:
    """0..count-1 reordered so that every prefix is spread over the range (van der Corput)."""
    bits = max(1, (count - 1).bit_length())
    keys = [int(f"{k:0{bits}b}"[::-1], 2) for k in range(count)]
    return sorted(range(count), key=keys.__getitem__)
