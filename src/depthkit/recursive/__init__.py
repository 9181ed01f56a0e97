"""Recursive (looped) transformers: a block of layers applied R times with the same weights.

`RecursiveModel.wrap(base)` loops a whole decoder (RecursiveVLM: Recursive Connector between
steps, Monotonic Recursion Loss); `relax(base, ...)` converts a pretrained N-layer model into K
shared layers looped N/K times with per-loop LoRA (Relaxed Recursive Transformers). Generation
keeps a KV cache per recursion step and can exit early per token.
"""

from depthkit.recursive.config import RecursiveConfig
from depthkit.recursive.connector import RecursiveConnector
from depthkit.recursive.model import RecursiveModel, RecursiveOutput, truncate_layers

__all__ = ["RecursiveConfig", "RecursiveConnector", "RecursiveModel", "RecursiveOutput", "truncate_layers"]
