"""Architecture adapters: a decoder block described by ROLES, not by one family's attribute names.

Every method in depthkit (analysis, flattening, block removal, recursion, recovery) reaches a
model's parts through an adapter, so code outside `depthkit.models` never names a sub-module.
A block is: a normed attention branch (`query`/`key`/`value` read the normed input, `attn_out`
writes the residual update), then a normed MLP branch (`gate`/`up` read, `mlp_out` writes). A
`Layout` says where each role lives inside a Hugging Face decoder layer and which optional parts
exist (post-norms on a branch's output, per-head q/k norms); the adapter adds how a norm's gain
applies (`w` or `1 + w`), whether embeddings are scaled, how a layer learns its cache index and its
attention type. Supporting a family with a known layout is one `register_adapter` entry here plus
a tiny config in `depthkit.models.tiny` for the tests.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from depthkit.errors import DepthkitError

# The projections of a block by role: inputs read the normed hidden state, outputs write the residual.
ATTENTION_INPUTS = ("query", "key", "value")
MLP_INPUTS = ("gate", "up")
ATTENTION_PROJECTIONS = (*ATTENTION_INPUTS, "attn_out")
PROJECTION_ROLES = (*ATTENTION_PROJECTIONS, *MLP_INPUTS, "mlp_out")
# Norms by role: before each branch (always), after each branch's output and per head on q/k (optional).
NORM_ROLES = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm")
ROLES = PROJECTION_ROLES + NORM_ROLES
# The LLaMA-named parts of depthkit <= 0.3 (keys of saved per-loop adapters), by role.
LEGACY_PART_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attn_out",
                     "gate_proj": "gate", "up_proj": "up", "down_proj": "mlp_out",
                     "input_norm": "attn_norm", "post_attention_norm": "mlp_norm"}


@dataclass(frozen=True)
class Layout:
    """Module paths (relative to one decoder layer) of every role; None: the family has no such part."""

    attention: str = "self_attn"
    mlp: str = "mlp"
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    value: str = "self_attn.v_proj"
    attn_out: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    mlp_out: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None


# LLaMA's pre-norm block, shared by Mistral and Qwen2; Qwen3 adds per-head q/k norms.
PRE_NORM = Layout()
PRE_NORM_QK = replace(PRE_NORM, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
# Gemma 2/3: a norm on both sides of each branch (the post-attention norm normalises attention's output).
SANDWICH_NORM_QK = replace(PRE_NORM_QK, mlp_norm="pre_feedforward_layernorm",
                           attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
SANDWICH_NORM = replace(SANDWICH_NORM_QK, q_norm=None, k_norm=None)


@dataclass
class BlockParts:
    """The modules of one decoder block, by role (see the module docstring)."""

    attn_norm: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    mlp_out: nn.Linear
    attn_post_norm: nn.Module | None = None
    mlp_post_norm: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    def role(self, name: str) -> nn.Module | None:
        return getattr(self, name)


@functools.cache
def accepts(function: Callable, name: str) -> bool:
    """Whether `function` declares a parameter `name` (read once per function: callers are on hot paths,
    such as every decoding step)."""
    return name in inspect.signature(function).parameters


def module_prefix(model: nn.Module, target: nn.Module) -> str:
    """The state-dict prefix of `target` inside `model` (e.g. `model.layers`)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise DepthkitError(f"{type(target).__name__} is not part of {type(model).__name__}")


def _resolve(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How depthkit reaches the parts of one family of Hugging Face decoders.

    `norm_offset` is 1.0 where a norm computes `x_hat * (1 + w)` (Gemma) and 0.0 where it computes
    `x_hat * w` (LLaMA): folding or replacing a gain must go through `norm_gain`/`set_norm_gain`,
    never through `.weight`. `softcap_config` names the config field of a final-logit soft cap.
    """

    model_type: str
    layout: Layout = PRE_NORM
    norm_offset: float = 0.0
    softcap_config: str | None = None
    attention_kernel: str = "sdpa"  # transformers' attn_implementation depthkit loads the family with

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
        types = [self.layer_type(layer, model.config) for layer in layers]
        self.decoder(model).layers = nn.ModuleList(layers)
        self.set_depth(model.config, types)
        for index, layer in enumerate(layers):
            self.set_layer_index(layer, index)

    @staticmethod
    def set_depth(config: PretrainedConfig, layer_types: list[str]) -> None:
        """`num_hidden_layers` and the per-layer fields of `config` for a stack of these attention types."""
        config.num_hidden_layers = len(layer_types)
        if getattr(config, "layer_types", None):
            config.layer_types = list(layer_types)
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, len(layer_types))

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        """The KV-cache slot a layer reads and writes (its position in the stack, or a loop's slot)."""
        self.attention_module(layer).layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index

    def layer_type(self, layer: nn.Module, config: PretrainedConfig) -> str:
        """`full_attention` or `sliding_attention` (the key of the mask and rotary tables it uses)."""
        attention = self.attention_module(layer)
        for holder, name in ((layer, "attention_type"), (attention, "layer_type"), (layer, "layer_type")):
            value = getattr(holder, name, None)
            if isinstance(value, str):
                return value
        return "full_attention"

    def embed_tokens(self, model: PreTrainedModel) -> nn.Embedding:
        """The input embedding module; calling it applies any embedding scale (`embed_scale`)."""
        return self.decoder(model).embed_tokens

    def embed_scale(self, model: PreTrainedModel) -> float:
        """What the embedding module multiplies looked-up rows by (sqrt(hidden) for Gemma, else 1)."""
        return float(getattr(self.embed_tokens(model), "scalar_embed_scale", 1.0))

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).norm

    def rotary_embedding(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).rotary_emb

    def position_embeddings(self, model: PreTrainedModel, hidden: torch.Tensor,
                            position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rotary (cos, sin) tables per attention type of the model (Gemma 3 has a base per type)."""
        rotary = self.rotary_embedding(model)
        kinds = set(getattr(model.config, "layer_types", None) or ()) | {"full_attention"}
        if accepts(type(rotary).forward, "layer_type"):
            return {kind: rotary(hidden, position_ids, kind) for kind in kinds & set(model.config.layer_types)}
        return dict.fromkeys(kinds, rotary(hidden, position_ids=position_ids))

    def lm_head(self, model: PreTrainedModel) -> nn.Linear:
        return model.lm_head

    def softcap(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        """The final-logit soft cap `c * tanh(logits / c)` where the family has one (Gemma 2)."""
        cap = getattr(config, self.softcap_config, None) if self.softcap_config else None
        return logits if not cap else torch.tanh(logits / cap) * cap

    # -- block level -------------------------------------------------------------------------
    def block(self, layer: nn.Module) -> BlockParts:
        values = {}
        for role in ROLES:
            path = getattr(self.layout, role)
            values[role] = _resolve(layer, path) if path is not None else None
        return BlockParts(**values)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The block's attention module (what holds the projections and the cache slot)."""
        return _resolve(layer, self.layout.attention)

    def replace_part(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        """Put `module` in the place of the block's `role` (e.g. a wider projection)."""
        path = getattr(self.layout, role)
        if path is None:
            raise DepthkitError(f"{self.model_type} blocks have no {role}")
        _replace_submodule(layer, path, module)

    def part_paths(self, roles: tuple[str, ...] = PROJECTION_ROLES) -> dict[str, str]:
        """Module paths inside a layer of the given roles that this family has (LoRA targets, keys)."""
        return {role: getattr(self.layout, role) for role in roles if getattr(self.layout, role) is not None}

    def projection_pattern(self, model: PreTrainedModel) -> str:
        """A regular expression (full match) of the module names of every block projection (LoRA targets)."""
        layers = re.escape(module_prefix(model, self.layers(model)))
        paths = "|".join(re.escape(path) for path in self.part_paths().values())
        return rf"(.*\.)?{layers}\.\d+\.({paths})"

    def attention_update(self, layer: nn.Module, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        """What the attention branch adds to the residual stream (post-norm included)."""
        parts = self.block(layer)
        update = self.attention_module(layer)(parts.attn_norm(hidden), **kwargs)[0]
        return parts.attn_post_norm(update) if parts.attn_post_norm is not None else update

    def mlp_update(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the MLP branch adds to the residual stream (post-norm included)."""
        parts = self.block(layer)
        update = _resolve(layer, self.layout.mlp)(parts.mlp_norm(hidden))
        return parts.mlp_post_norm(update) if parts.mlp_post_norm is not None else update

    def has_post_norms(self) -> bool:
        return self.layout.attn_post_norm is not None or self.layout.mlp_post_norm is not None

    # -- norms -------------------------------------------------------------------------------
    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor a norm applies after normalising (float32)."""
        return norm.weight.detach().float() + self.norm_offset

    def set_norm_gain(self, norm: nn.Module, gain: torch.Tensor | float) -> None:
        with torch.no_grad():
            norm.weight.copy_(torch.as_tensor(gain, dtype=torch.float32) - self.norm_offset)

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        """The epsilon a norm adds to the mean square (LLaMA's RMSNorm calls it `variance_epsilon`)."""
        return getattr(norm, "variance_epsilon", None) or norm.eps

    def apply_norm(self, norm: nn.Module, hidden: torch.Tensor, weight: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """`norm(hidden)` (whose output has `dtype`) computed with `weight` in place of the module's own
        (per-loop norms), in the dtype steps of the family's RMSNorm so that equal weights give equal outputs."""
        x = hidden.float()
        normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps(norm))
        if self.norm_offset:  # Gemma: scale in float32, then cast
            return (normalised * (self.norm_offset + weight.float())).to(dtype)
        return weight.to(dtype) * normalised.to(hidden.dtype)

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

    def set_heads_per_group(self, layer: nn.Module, heads: int) -> None:
        """Query heads per KV head of `layer`'s attention (transformers repeats the keys that often)."""
        self.attention_module(layer).num_key_value_groups = heads

    def set_widths(self, model: PreTrainedModel, heads: int, intermediate: int) -> None:
        """Make `heads` query heads and `intermediate` MLP neurons per block the model's (width pruning):
        the config (with `head_dim` written out, since it no longer follows from hidden / heads) and
        the per-module copies transformers keeps (query heads per KV head)."""
        config = model.config
        config.head_dim = self.head_dim(config)
        config.num_attention_heads, config.intermediate_size = heads, intermediate
        for layer in self.layers(model):
            self.set_heads_per_group(layer, heads // self.num_kv_heads(config))
            mlp = _resolve(layer, self.layout.mlp)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = intermediate


ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Make `adapter` available for its `model_type` (a second adapter for one type is an error)."""
    if adapter.model_type in ADAPTERS:
        raise DepthkitError(f"an adapter for '{adapter.model_type}' is already registered")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


for _adapter in (
    ArchitectureAdapter("llama"),
    ArchitectureAdapter("mistral"),
    ArchitectureAdapter("qwen2"),
    ArchitectureAdapter("qwen3", layout=PRE_NORM_QK),
    # Gemma 2 soft-caps attention logits, which transformers' SDPA path cannot do.
    ArchitectureAdapter("gemma2", layout=SANDWICH_NORM, norm_offset=1.0, softcap_config="final_logit_softcapping",
                        attention_kernel="eager"),
    ArchitectureAdapter("gemma3_text", layout=SANDWICH_NORM_QK, norm_offset=1.0,
                        softcap_config="final_logit_softcapping"),
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



def attention_implementation(config: PretrainedConfig) -> str:
    """The `attn_implementation` to load a model with: SDPA, unless its family cannot use it."""
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return adapter.attention_kernel if adapter is not None else "sdpa"
