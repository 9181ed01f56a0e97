"""Relaxed Recursive Transformers: convert a pretrained N-layer model into K shared layers.

Sharing patterns map every original layer i to (shared layer, loop position):
- CYCLE    (1..K, 1..K, ...): layer i -> (i mod K, i div K), the block looped N/K times;
- SEQUENCE (1,1,2,2,...):     layer i -> (i div (N/K), i mod (N/K)), each layer repeated in place;
- MIDDLE   (first and last layers stay unique, the K-2 middle layers cycle (N-2)/(K-2) times).
A shared layer is initialised Stepwise (source layers `round(linspace(first, last, K))`), Lower
(the first K), Average (mean of every layer tied to it) or Random.

Relaxation: each (shared layer, loop) gets a LoRA on every projection initialised from the
truncated SVD of the residual `W_orig - W_shared` (B = U_r S_r, A = V_r^T), plus that loop's own
RMSNorm weights and bias deltas. The per-loop norms start from the SHARED layer's norms
(`loop_norms="shared"`, as Mixture-of-Recursions and the Relaxed Recursive paper relax only through
LoRA); `loop_norms="original"` copies each original layer's norms instead, which makes a rank-r
model better than the method itself (results and cards flag it). Full rank with original norms
reproduces the original model; rank 0 is the strict recursive model (everything shared).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.recursive.config import RecursiveConfig
from depthkit.recursive.lora import NORMS, PROJECTIONS, lora_key
from depthkit.recursive.model import RecursiveModel, stepwise_picks

SHARINGS = ("cycle", "sequence", "middle")
INITS = ("stepwise", "lower", "average", "random")
LOOP_NORMS = ("shared", "original")


@dataclass
class SharingPlan:
    """Where every original layer goes: `assignment[i] = (shared layer, loop position)`."""

    prelude: list[int]
    block: list[int]
    coda: list[int]
    order: str
    loops: int
    assignment: list[tuple[int, int]]

    def tied(self, shared: int) -> list[int]:
        """Original layers that shared layer `shared` stands for."""
        return [i for i, (k, _) in enumerate(self.assignment) if k == shared]


def sharing_plan(pattern: str, num_layers: int, num_shared: int) -> SharingPlan:
    """The sharing map of `pattern` for N = `num_layers` original and K = `num_shared` shared layers."""
    require(pattern in SHARINGS, f"unknown sharing pattern '{pattern}'; choose from {', '.join(SHARINGS)}")
    n, k = num_layers, num_shared
    require(1 <= k < n, f"the number of shared layers must be in 1..{n - 1} for a {n}-layer model, got {k}")
    if pattern == "middle":
        require(k >= 3 and (n - 2) % (k - 2) == 0,
                f"MIDDLE sharing keeps the first and last layers unique: needs K >= 3 and (N-2) divisible by "
                f"(K-2); got N={n}, K={k}")
        loops, middle = (n - 2) // (k - 2), k - 2
        assignment = [(0, 0)] + [(1 + (i % middle), i // middle) for i in range(n - 2)] + [(k - 1, 0)]
        return SharingPlan([0], list(range(1, k - 1)), [k - 1], "cycle", loops, assignment)
    require(n % k == 0, f"{pattern.upper()} sharing needs N divisible by K; got N={n}, K={k}")
    loops = n // k
    if pattern == "cycle":
        assignment = [(i % k, i // k) for i in range(n)]
    else:
        assignment = [(i // loops, i % loops) for i in range(n)]
    return SharingPlan([], list(range(k)), [], pattern if pattern == "sequence" else "cycle", loops, assignment)


def init_sources(plan: SharingPlan, init: str) -> dict[int, list[int]]:
    """Original layers each shared layer is initialised from (averaged when several)."""
    require(init in INITS, f"unknown initialisation '{init}'; choose from {', '.join(INITS)}")
    sources = {k: [plan.tied(k)[0]] for k in plan.prelude + plan.coda}  # unique layers keep their own
    tied = [i for k in plan.block for i in plan.tied(k)]
    first, last = min(tied), max(tied)
    if init == "stepwise":
        picks = stepwise_picks(first, last, len(plan.block))
    else:
        picks = list(range(first, first + len(plan.block)))
    for index, k in enumerate(plan.block):
        sources[k] = plan.tied(k) if init == "average" else [picks[index]]
    return sources


@torch.no_grad()
def build_shared_layer(originals: list[nn.Module], sources: list[int], init: str,
                       initializer_range: float) -> nn.Module:
    """A copy of the (first) source layer, averaged over all sources or re-initialised as `init` says."""
    layer = copy.deepcopy(originals[sources[0]])
    params = dict(layer.named_parameters())
    if init == "average" and len(sources) > 1:
        for name, param in params.items():
            stacked = torch.stack([dict(originals[i].named_parameters())[name].float() for i in sources])
            param.copy_(stacked.mean(0).to(param.dtype))
    if init == "random":
        for name, param in params.items():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, initializer_range)
    return layer


def relax(base: PreTrainedModel, num_shared: int, sharing: str = "cycle", init: str = "stepwise",
          rank: int | str = 0, seed: int = 0, loop_norms: str = "shared") -> RecursiveModel:
    """Convert `base` in place to `num_shared` shared layers with per-loop LoRA of `rank` ("full" with
    `loop_norms="original"` = exact), each loop's norms starting from `loop_norms`."""
    require(loop_norms in LOOP_NORMS, f"unknown loop_norms '{loop_norms}'; choose from {', '.join(LOOP_NORMS)}")
    adapter = get_adapter(base)
    originals = list(adapter.layers(base))
    plan = sharing_plan(sharing, len(originals), num_shared)
    sources = init_sources(plan, init)
    torch.manual_seed(seed)
    std = getattr(base.config, "initializer_range", 0.02)
    shared = [build_shared_layer(originals, sources[k], init if k in plan.block else "lower", std)
              for k in range(num_shared)]
    adapter.set_layers(base, shared)
    config = RecursiveConfig(
        block=plan.block, prelude=plan.prelude, coda=plan.coda, order=plan.order, num_loops=plan.loops,
        feedback="vanilla", loop_lora_rank=rank, relaxed_loops=plan.loops,
        source={"sharing": sharing, "init": init, "loop_norms": loop_norms, "original_layers": len(originals),
                "assignment": [list(a) for a in plan.assignment], "init_sources": sources},
    )
    model = RecursiveModel(base, config)
    init_relaxation(model, originals, plan, loop_norms)
    return model


@torch.no_grad()
def init_relaxation(model: RecursiveModel, originals: list[nn.Module], plan: SharingPlan,
                    loop_norms: str = "shared") -> None:
    """Set every loop's LoRA to the truncated SVD of `W_orig - W_shared` (with its bias delta) and its
    norms to the shared layer's (or, with `loop_norms="original"`, the original layer's)."""
    adapter = model.adapter
    for index, (k, loop) in enumerate(plan.assignment):
        if k not in plan.block:
            continue
        source, target = adapter.block(originals[index]), adapter.block(model.layers[k])
        norm_source = source if loop_norms == "original" else target
        for name in PROJECTIONS:
            key = lora_key(k, name, loop)
            if key in model.adapters.relax:
                set_svd_lora(model.adapters.relax[key], getattr(source, name), getattr(target, name))
        for name in NORMS:
            key = lora_key(k, name, loop)
            if key in model.adapters.norms:
                model.adapters.norms[key].copy_(getattr(norm_source, name).weight.float())


def set_svd_lora(lora: nn.Module, original: nn.Linear, shared: nn.Linear) -> None:
    """B = U_r S_r, A = V_r^T of the residual (in float64, so full rank is exact to float32 precision)."""
    residual = original.weight.double() - shared.weight.double()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    rank = lora.lora_A.shape[0]
    lora.lora_B.copy_((u[:, :rank] * s[:rank]).to(lora.lora_B.dtype))
    lora.lora_A.copy_(vh[:rank].to(lora.lora_A.dtype))
    if lora.bias is not None:
        lora.bias.copy_((original.bias.double() - shared.bias.double()).to(lora.bias.dtype))
