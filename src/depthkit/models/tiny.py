"""Tiny randomly initialised models of every supported architecture.

Unit tests check the exactness of weight transforms on these (seconds, no download); users can
try commands on them too (`--model tiny:llama`).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from depthkit.errors import DepthkitError
from depthkit.models.adapters import attention_implementation

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}
# Gemma mixes sliding-window and full-attention layers; the tiny ones have a window shorter than
# the test sequences (so the masks differ) and a full-attention layer every third block.
_GEMMA = ("gemma2", "gemma3_text")


TINY_ARCHITECTURES = tuple(_CONFIGS)
# Those whose blocks FlattenGPT can flatten exactly (no post-norms on a branch's output).
PRE_NORM_ARCHITECTURES = tuple(arch for arch in TINY_ARCHITECTURES if not arch.startswith("gemma"))


def tiny_config(model_type: str, num_layers: int = 4, **overrides):
    """A small config (hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 256)."""
    if model_type not in _CONFIGS:
        raise DepthkitError(f"no tiny config for '{model_type}'; choose from {', '.join(_CONFIGS)}")
    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    if model_type in _GEMMA:
        types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]
        settings |= dict(sliding_window=8, tie_word_embeddings=True, layer_types=types)
    settings.update(overrides)
    return _CONFIGS[model_type](**settings)


def tiny_model(model_type: str, num_layers: int = 4, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM; norm weights are randomised too so folds are tested."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_layers, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config), dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.05)
    return model.eval()
