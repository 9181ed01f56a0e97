"""Width pruning at the parameter count of a depth cut: the controls FlattenGPT must beat.

FlattenGPT claims to beat channel pruning as well as block pruning at the same size. Two width
methods make that testable; both keep every block and give every block the same smaller widths
(fewer query heads per KV group, fewer MLP neurons), so the result is a plain checkpoint:

- `width`: FlattenGPT's own channel selection and least-squares compensation (`GroupPruner`,
  same criterion, ridge and sequential target, front to back with error propagation) applied
  to every block without flattening: the control that isolates depth from width.
- `minitron`: Minitron's activation importance (Muralidharan et al., 2024, "Compact Language Models
  via Pruning and Knowledge Distillation"): a head ranks by the energy of its output, a neuron by
  the energy of its activation, measured on the original model; the kept weights are not refit.

Budget: `--ratio`/`--target-layers` ask for the parameter count of the depth cut, i.e. every block
keeps (depth - removed) / depth of its parameters. Query heads per KV group are that fraction of
the original, rounded (`heads_per_group` overrides), and the MLP width is what brings the block to
the budget. A ratio that leaves no query head in a KV group is refused.

With `--offload disk` the blocks are pruned one at a time from the checkpoint's files (one block,
its pruned copy and the calibration activations in memory) and the config is written for the new
widths: the same weights as in memory.

Plan: the widths every block keeps (`reuse` "exact": they are the parameter budget of one count,
rounded, so another count needs other widths). Which heads and neurons stay is chosen in apply,
as FlattenGPT's channels are, because the choice cannot be made apart from the pruning: `width`
chooses block i's channels on what the already refit blocks before it produce, and Minitron
ranks the MLP neurons on the output of the block's already pruned attention, so both depend on
the budget and a ranking searched for one count would not be another's. A plan therefore saves
no work here; it records the budget, and applies with other fitting options or tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from depthkit.compress.base import CompressionMethod, CompressionOutcome, MethodOptions, option, register_method
from depthkit.compress.flatten import PRUNING_OPTIONS, PruneOptions
from depthkit.compress.flatten.prune import Widths, flatten_and_prune
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import require
from depthkit.models.adapters import ArchitectureAdapter, get_adapter
from depthkit.models.runner import BlockSink, BlockSource

HEADS_PER_GROUP_HELP = ("query heads kept per KV group (default: the kept fraction of parameters, rounded; the MLP "
                        "takes up the rest of the budget)")


@dataclass
class WidthOptions(PruneOptions):
    heads_per_group: int | None = option(None, HEADS_PER_GROUP_HELP)

    def validate(self) -> None:
        super().validate()
        check_heads_per_group(self.heads_per_group)


@dataclass
class MinitronOptions(MethodOptions):
    """Minitron's ranking is fixed (activation energy, no refit): only the budget split is an option."""

    heads_per_group: int | None = option(None, HEADS_PER_GROUP_HELP)

    def validate(self) -> None:
        super().validate()
        check_heads_per_group(self.heads_per_group)


def check_heads_per_group(heads: object) -> None:
    """A default of None leaves the option's text unconverted: check it here, before any model is loaded."""
    require(heads is None or (isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1),
            f"heads_per_group must be a whole number >= 1, got {heads!r}")


@dataclass(frozen=True)
class BlockCosts:
    """Parameters of one block: fixed, per kept query head, per kept MLP neuron."""

    total: int
    per_head: int
    per_neuron: int

    @classmethod
    def of(cls, adapter: ArchitectureAdapter, layer: nn.Module, head_dim: int) -> BlockCosts:
        parts = adapter.block(layer)
        per_head = head_dim * (parts.query.in_features + (parts.query.bias is not None) + parts.attn_out.out_features)
        per_neuron = sum(proj.in_features + (proj.bias is not None) for proj in (parts.gate, parts.up))
        per_neuron += parts.mlp_out.out_features
        return cls(sum(p.numel() for p in layer.parameters()), per_head, per_neuron)


def plan_widths(model: PreTrainedModel, keep_fraction: float, heads_per_group: int | None) -> tuple[Widths, dict]:
    """The uniform widths that keep `keep_fraction` of every block's parameters, and the budget figures."""
    adapter = get_adapter(model)
    config = model.config
    kv, per_group = adapter.num_kv_heads(config), adapter.num_heads(config) // adapter.num_kv_heads(config)
    neurons = adapter.intermediate_size(config)
    heads = heads_per_group if heads_per_group is not None else round(per_group * keep_fraction)
    require(1 <= heads <= per_group,
            f"width pruning to {keep_fraction:.0%} of each block would keep {heads} of {per_group} query heads per "
            f"KV group; at least 1 must stay (a lower ratio, or option heads_per_group 1..{per_group})")
    costs = BlockCosts.of(adapter, adapter.layers(model)[0], adapter.head_dim(config))
    budget = keep_fraction * costs.total
    fixed = costs.total - kv * per_group * costs.per_head - neurons * costs.per_neuron
    kept_neurons = round((budget - fixed - kv * heads * costs.per_head) / costs.per_neuron)
    require(1 <= kept_neurons <= neurons,
            f"with {heads} query heads per KV group the MLP would need {kept_neurons} of {neurons} neurons to keep "
            f"{keep_fraction:.0%} of each block's parameters; choose another heads_per_group")
    kept = fixed + kv * heads * costs.per_head + kept_neurons * costs.per_neuron
    return Widths(kv, heads, kept_neurons), {
        "query_heads_per_kv_group": [per_group, heads], "mlp_neurons": [neurons, kept_neurons],
        "block_parameters": [costs.total, kept], "budget_fraction": keep_fraction,
    }


class _WidthPruning(CompressionMethod):
    """Every block pruned to the same widths, front to back on the calibration tokens."""

    refit: ClassVar[bool] = True
    options_class = WidthOptions
    # Only `heads_per_group` shapes the widths (the search); the rest is how apply prunes.
    apply_options = PRUNING_OPTIONS | {"batch_size", "qk_norm"}

    def prune_options(self) -> WidthOptions:
        """The pruning settings (`width`: the user's options)."""
        return self.settings

    @property
    def refits_weights(self) -> bool:
        return self.refit

    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        """The widths that keep (depth - num_remove) / depth of every block's parameters: from the
        config and one block's shapes, no calibration."""
        depth = len(source.layers())
        widths, budget = plan_widths(source.model, (depth - num_remove) / depth, self.settings.heads_per_group)
        return self.new_plan(source, num_remove, "exact", [], {"widths": budget, "kept_widths": asdict(widths)},
                             "its widths are the parameter budget of this count")

    def check_plan(self, plan: CompressionPlan, num_layers: int, num_remove: int) -> None:
        super().check_plan(plan, num_layers, num_remove)
        planned_widths(plan)

    @torch.no_grad()
    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """Blocks pruned front to back to the plan's widths (one in memory at a time when streamed);
        the sink's config takes the new widths."""
        plan.check_count(num_remove)
        widths = planned_widths(plan)
        depth = len(source.layers())
        records = flatten_and_prune(source, [[i] for i in range(depth)], calib_ids,
                                    self.prune_options().prune_settings(self.refit), sink, widths=widths,
                                    propagate=self.refit)
        sink.set_widths(widths.kv_groups * widths.heads_per_group, widths.neurons)
        return CompressionOutcome({"widths": plan.details.get("widths"), "blocks": records,
                                   "fit_tokens": int(calib_ids.numel())})


def planned_widths(plan: CompressionPlan) -> Widths:
    """The widths a width plan keeps, checked (a hand-edited plan is one clear error)."""
    kept = plan.details.get("kept_widths")
    names = [f.name for f in fields(Widths)]
    require(isinstance(kept, dict) and sorted(kept) == sorted(names)
            and all(isinstance(kept[name], int) and kept[name] >= 1 for name in names),
            f"the plan's kept_widths must give {', '.join(names)} as whole numbers >= 1, got {kept!r}")
    return Widths(**kept)


@register_method("width")
class WidthPruning(_WidthPruning):
    description = ("width control: every block pruned to fewer heads and MLP neurons at the depth cut's parameter "
                   "count, with FlattenGPT's channel selection and least squares")

    def deviations(self) -> list[str]:
        return ["depthkit's control, not a published method: FlattenGPT's pruning stage without flattening"]



@register_method("minitron")
class MinitronWidth(_WidthPruning):
    description = "Minitron width pruning: heads and MLP neurons ranked by activation energy, no refit"
    paper = ("Muralidharan et al., 2024, Compact Language Models via Pruning and Knowledge Distillation "
             "(Minitron), width pruning")
    refit = False
    options_class = MinitronOptions
    apply_options = frozenset({"batch_size"})

    def prune_options(self) -> WidthOptions:
        return WidthOptions(batch_size=self.settings.batch_size, heads_per_group=self.settings.heads_per_group,
                            criterion="activation")

    def deviations(self) -> list[str]:
        return [
            "heads and MLP neurons only: Minitron also prunes the embedding (hidden) channels, which depthkit "
            "leaves whole",
            "importance aggregated as the sum of squares over every calibration token; the paper compares "
            "several batch/sequence aggregations",
            "query heads are pruned uniformly inside every KV group, every block to the same widths (a plain "
            "checkpoint needs uniform widths)",
            "no distillation afterwards (Minitron's recovery): use `depthkit recover` and compare like with like",
        ]
