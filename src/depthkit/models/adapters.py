"""Architecture adapters: uniform access to the blocks of a decoder-only causal LM.

Every method in depthkit (analysis, flattening, block removal, recursion) talks to a model
through an adapter instead of poking at attribute names, so supporting a new architecture means
registering one adapter here. Adapters are registered by the config's `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from depthkit.errors import DepthkitError


@dataclass
class BlockParts:
    """The sub-modules of one pre-norm decoder block (attention then MLP, each with an RMSNorm)."""

    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_attention_norm: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to reach the blocks of one family of Hugging Face decoders.

    The LLaMA layout (`model.model.layers[i].self_attn.q_proj`, `.mlp.gate_proj`, ...) is shared
    by Mistral, Qwen2 and Qwen3; `qk_norm` marks Qwen3's per-head RMSNorm on queries and keys.
    """

    model_type: str
    qk_norm: bool = False

    # -- model level -------------------------------------------------------------------------
    def decoder(self, model: PreTrainedModel) -> nn.Module:
        """The base decoder (embeddings, layers, final norm, rotary embedding)."""
        return model.model

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return self.decoder(model).layers

    def set_layers(self, model: PreTrainedModel, layers: list[nn.Module]) -> None:
        """Replace the block list and keep the config and each block's cache index consistent.

        Saved checkpoints must reload in plain transformers, so `num_hidden_layers` and any
        per-layer config list (`layer_types`) must follow the new depth.
        """
        decoder = self.decoder(model)
        old_types = list(getattr(model.config, "layer_types", None) or [])
        decoder.layers = nn.ModuleList(layers)
        model.config.num_hidden_layers = len(layers)
        if old_types:
            model.config.layer_types = [
                getattr(layer, "attention_type", None) or old_types[0] for layer in layers
            ]
        if getattr(model.config, "max_window_layers", None) is not None:
            model.config.max_window_layers = min(model.config.max_window_layers, len(layers))
        for index, layer in enumerate(layers):
            layer.self_attn.layer_idx = index

    def embed_tokens(self, model: PreTrainedModel) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).norm

    def rotary_embedding(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).rotary_emb

    def lm_head(self, model: PreTrainedModel) -> nn.Linear:
        return model.lm_head

    # -- block level -------------------------------------------------------------------------
    def block(self, layer: nn.Module) -> BlockParts:
        attn, mlp = layer.self_attn, layer.mlp
        return BlockParts(
            input_norm=layer.input_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            post_attention_norm=layer.post_attention_layernorm,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
            q_norm=getattr(attn, "q_norm", None) if self.qk_norm else None,
            k_norm=getattr(attn, "k_norm", None) if self.qk_norm else None,
        )

    # -- shapes ------------------------------------------------------------------------------
    @staticmethod
    def num_heads(config: PretrainedConfig) -> int:
        return config.num_attention_heads

    @staticmethod
    def num_kv_heads(config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    @staticmethod
    def head_dim(config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def intermediate_size(config: PretrainedConfig) -> int:
        return config.intermediate_size


ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Make `adapter` available for its `model_type`."""
    ADAPTERS[adapter.model_type] = adapter
    return adapter


for _adapter in (
    ArchitectureAdapter("llama"),
    ArchitectureAdapter("mistral"),
    ArchitectureAdapter("qwen2"),
    ArchitectureAdapter("qwen3", qk_norm=True),
):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchitectureAdapter:
    """The adapter for a model (or config); a clear error naming the supported architectures."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise DepthkitError(
            f"unsupported architecture '{model_type}': depthkit has adapters for "
            f"{', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]
