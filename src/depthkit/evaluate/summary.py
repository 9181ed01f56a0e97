"""What every evaluation result records about the model it measured: size and depth."""

from __future__ import annotations

from transformers import PreTrainedModel


def model_summary(model: PreTrainedModel) -> dict:
    """Parameter count (tied embeddings once) and number of layers (from the config, which
    `ArchitectureAdapter.set_layers` keeps consistent after depth changes)."""
    unique = {id(p): p.numel() for p in model.parameters()}
    return {"parameters": sum(unique.values()), "layers": getattr(model.config, "num_hidden_layers", None)}
