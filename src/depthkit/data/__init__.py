"""Corpora (offline books, local files, WikiText-2) and token blocks with non-overlapping splits."""

from depthkit.data.blocks import (
    SPLITS,
    DataSpec,
    interleaved_blocks,
    split_documents,
    token_blocks,
    token_stream,
)
from depthkit.data.corpora import AUSTEN_BOOKS, FETCHERS, Document, load_documents

__all__ = [
    "AUSTEN_BOOKS",
    "FETCHERS",
    "SPLITS",
    "DataSpec",
    "Document",
    "interleaved_blocks",
    "load_documents",
    "split_documents",
    "token_blocks",
    "token_stream",
]
