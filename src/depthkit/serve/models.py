"""What `depthkit serve` can serve: a plain checkpoint (original or compressed) or a looped model.

A plain checkpoint is served as a `RecursiveModel` that runs its whole decoder once, so one
engine serves both kinds. The `base/` folder inside a looped model is NOT that model (it lacks the
loop plan and the connector/adapter weights), so it is refused rather than served as a plain one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from depthkit.errors import DepthkitError
from depthkit.models.loading import load_model, load_tokenizer
from depthkit.recursive.config import CONFIG_FILE
from depthkit.recursive.model import BASE_DIR, RecursiveModel, tokenizer_folder


def load_servable(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "cpu"
                  ) -> tuple[RecursiveModel, PreTrainedTokenizerBase]:
    """The model to serve and its tokenizer."""
    path = Path(name_or_path)
    if (path / CONFIG_FILE).exists():
        model = RecursiveModel.from_pretrained(path, dtype, device)
        return model, load_tokenizer(str(tokenizer_folder(path)))
    if path.name == BASE_DIR and (path.parent / CONFIG_FILE).exists():
        raise DepthkitError(f"{path} is the base of the looped model in {path.parent}, not a model of its own; "
                            f"serve {path.parent}")
    base, tokenizer = load_model(name_or_path, dtype, device)
    return RecursiveModel.wrap(base, num_loops=1, feedback="vanilla"), tokenizer


def eos_token_ids(model: RecursiveModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the generation config's (a chat model's
    end-of-turn token is often only there)."""
    found = {tokenizer.eos_token_id}
    configured = getattr(getattr(model.base, "generation_config", None), "eos_token_id", None)
    found |= set(configured) if isinstance(configured, list) else {configured}
    return {token for token in found if token is not None}


def served_name(name_or_path: str) -> str:
    """The name clients use: a folder's own name, or the hub id / alias as given."""
    path = Path(name_or_path)
    return path.resolve().name if path.exists() else name_or_path

