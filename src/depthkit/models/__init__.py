"""Architecture adapters and model loading."""

from depthkit.models.adapters import ArchitectureAdapter, BlockParts, get_adapter, supported_model_types
from depthkit.models.loading import DEFAULT_MODEL, load_model, load_tokenizer

__all__ = [
    "ArchitectureAdapter",
    "BlockParts",
    "DEFAULT_MODEL",
    "get_adapter",
    "load_model",
    "load_tokenizer",
    "supported_model_types",
]
