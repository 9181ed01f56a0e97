"""LoRA adapters and per-loop norm weights that change a shared layer depending on the loop.

A recursive model applies the SAME layer module several times in one forward pass, and the
relaxed model needs a different adapter at each application (loop position). peft cannot
express that: its active adapter is switched model-wide (`set_adapter`, which also toggles
`requires_grad`), not per call of one module inside a forward pass, and its initialisers cannot
take a per-loop SVD of a residual. So depthkit uses small custom modules attached with forward
hooks: the base model stays a plain Hugging Face model (its checkpoint reloads in transformers
unchanged), the adapters live in their own module (saved to their own safetensors file), and
the recursive model says which (layer, loop) is active before each layer application.

Adapters are float32 even on a bfloat16 base: bf16 cannot hold small Adam updates of a
zero-initialised LoRA B matrix.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from depthkit.errors import require
from depthkit.models.adapters import LEGACY_PART_NAMES, NORM_ROLES, PROJECTION_ROLES, get_adapter
from depthkit.recursive.config import RecursiveConfig

PROJECTIONS = PROJECTION_ROLES
NORMS = NORM_ROLES
_LEGACY_KEY = re.compile(r"(?<=\.)(\d+)_(" + "|".join(LEGACY_PART_NAMES) + r")(?=_loop\d+|\.|$)")


def migrate_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter keys saved by depthkit <= 0.3 (`3_q_proj_loop0`) under their role names (`3_query_loop0`)."""
    return {_LEGACY_KEY.sub(lambda m: f"{m[1]}_{LEGACY_PART_NAMES[m[2]]}", key): value for key, value in state.items()}


class LoRA(nn.Module):
    """delta(x) = scaling * B A x (+ bias delta): a low-rank correction of one linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float = 1.0, bias: bool = False):
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return delta + self.bias if self.bias is not None else delta


def lora_key(layer: int, name: str, loop: int | None = None) -> str:
    """Key of an adapter: shared by every loop (`loop=None`) or specific to one loop position."""
    return f"{layer}_{name}" if loop is None else f"{layer}_{name}_loop{loop}"


def max_rank(linear: nn.Linear) -> int:
    return min(linear.in_features, linear.out_features)


def resolve_rank(rank: int | str, linear: nn.Linear, name: str) -> int:
    """'full' means the layer's own rank; an integer rank above it is an error, not a silent clamp."""
    full = max_rank(linear)
    if rank == "full":
        return full
    require(rank <= full, f"LoRA rank {rank} is above the rank of {name} ({linear.out_features} x "
                          f"{linear.in_features}, at most {full}); use 'full' or a rank <= {full}")
    return int(rank)


def native_applications(config: RecursiveConfig) -> list[tuple[int, int]]:
    """Every (layer, loop) application of the block at the model's native loop count."""
    loops = config.relaxed_loops
    return [app for step in range(config.num_steps(loops)) for app in config.step_applications(step, loops)]


class LoopAdapters(nn.Module):
    """Adapters of a recursive model, keyed by (layer, projection[, loop]), plus per-loop norms.

    `relax` holds the per-loop LoRA (+ bias deltas) and `norms` the per-loop RMSNorm weights of
    a relaxed conversion; `shared` holds fine-tuning LoRA applied at every loop. The module is
    rebuilt from the config alone (shapes included), so checkpoints load with strict keys.
    """

    def __init__(self, base: PreTrainedModel, config: RecursiveConfig):
        super().__init__()
        self.relax = nn.ModuleDict()
        self.shared = nn.ModuleDict()
        self.norms = nn.ParameterDict()
        self.active: tuple[int, int] | None = None
        self._handles: list = []
        adapter = self.architecture = get_adapter(base)
        layers = adapter.layers(base)
        relaxed = config.loop_lora_rank == "full" or config.loop_lora_rank > 0
        for layer, loop in native_applications(config) if relaxed else []:
            parts = adapter.block(layers[layer])
            for name in PROJECTIONS:
                linear = getattr(parts, name)
                rank = resolve_rank(config.loop_lora_rank, linear, f"layer {layer} {name}")
                lora = LoRA(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
                # B = 0 keeps the start exact; a non-zero A lets B learn where no SVD init follows
                # (a whole decoder looped with per-loop LoRA). The relaxed conversion overwrites both.
                nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
                self.relax[lora_key(layer, name, loop)] = lora
            for name in NORMS:
                norm = getattr(parts, name)
                if norm is not None:
                    self.norms[lora_key(layer, name, loop)] = nn.Parameter(norm.weight.detach().float().clone())
        if config.lora_rank:
            alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank
            for layer in sorted(set(config.prelude + config.block + config.coda)):
                parts = adapter.block(layers[layer])
                for name in PROJECTIONS:
                    linear = getattr(parts, name)
                    rank = resolve_rank(config.lora_rank, linear, f"layer {layer} {name}")
                    lora = LoRA(linear.in_features, linear.out_features, rank, scaling=alpha / rank)
                    nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
                    self.shared[lora_key(layer, name)] = lora
        self.attach(base)

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, base: PreTrainedModel) -> None:
        """Hook every adapted module of the base model (once; re-attaching replaces the hooks)."""
        self.detach()
        adapter = get_adapter(base)
        layers = adapter.layers(base)
        for layer in range(len(layers)):
            parts = adapter.block(layers[layer])
            for name in PROJECTIONS:
                if self._has(self.relax, layer, name) or lora_key(layer, name) in self.shared:
                    self._handles.append(getattr(parts, name).register_forward_hook(self._linear_hook(layer, name)))
            for name in NORMS:
                if getattr(parts, name) is not None and self._has(self.norms, layer, name):
                    self._handles.append(getattr(parts, name).register_forward_hook(self._norm_hook(layer, name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _has(container: nn.Module, layer: int, name: str) -> bool:
        prefix = f"{lora_key(layer, name)}_loop"
        return any(key.startswith(prefix) for key in container)

    def _linear_hook(self, layer: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.active is None or self.active[0] != layer:
                return output
            shared, relax = lora_key(layer, name), lora_key(layer, name, self.active[1])
            if shared in self.shared:
                output = output + self.shared[shared](args[0]).to(output.dtype)
            if relax in self.relax:
                output = output + self.relax[relax](args[0]).to(output.dtype)
            return output

        return hook

    def _norm_hook(self, layer: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.active is None or self.active[0] != layer:
                return output
            key = lora_key(layer, name, self.active[1])
            if key not in self.norms:
                return output
            return self.architecture.apply_norm(module, args[0], self.norms[key], output.dtype)

        return hook

    @contextlib.contextmanager
    def activate(self, layer: int, loop: int) -> Iterator[None]:
        """Mark (layer, loop) as the application being run, so hooks pick its adapters."""
        previous, self.active = self.active, (layer, loop)
        try:
            yield
        finally:
            self.active = previous
