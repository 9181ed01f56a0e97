"""FlattenGPT: depth compression by flattening adjacent blocks, then pruning channels back.

Pipeline: choose groups of adjacent blocks on a small selection set (`selection.py`; the search,
`flatten_steps`), flatten each group into one wide block (`merge.py`, exact), then prune the
wide blocks back to the original heads/neurons with least-squares compensation fitted on the
calibration set, front to back with error propagation (`prune.py`, `channels.py`; the apply,
`apply_steps`). `flatten_gpt` runs both.

The search's steps are the flattens in the order it chose them, each removing one block (a plan's
`steps`). Both selections are greedy: the re-scored one picks each flatten on the model left by the
flattens before it, the one-pass one takes the best-scored disjoint pairs of the original model in
turn; neither looks at how many flattens are asked for. A search for fewer blocks therefore makes
the same first choices and stops earlier: the first k' steps of a plan searched for k >= k' are
exactly what a search for k' chooses. Explicit `groups` fix the count.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from depthkit.compress.base import MethodOptions, option
from depthkit.compress.common import SearchOptions
from depthkit.compress.flatten.channels import CRITERIA
from depthkit.compress.flatten.merge import QK_NORM_DEFAULT, QK_NORM_MODES, flatten_layers
from depthkit.compress.flatten.prune import RIDGE_PRIORS, TARGETS, PruneSettings, flatten_and_prune
from depthkit.compress.flatten.selection import ONE_PASS_SELECTIONS, SELECTIONS, one_pass_pairs, select_groups
from depthkit.errors import require
from depthkit.models.runner import BlockSink, BlockSource, ModelSink, as_source

__all__ = [
    "PRUNING_OPTIONS", "FlattenOptions", "PruneOptions", "apply_steps", "check_groups", "flatten_gpt", "flatten_layers",
    "flatten_steps", "select_groups", "flatten_and_prune",
]


@dataclass
class PruneOptions(MethodOptions):
    """How blocks are pruned and refit: shared by FlattenGPT (wide blocks back to one block's width)
    and width pruning (every block to fewer heads and neurons)."""

    criterion: str = option("ols", "MLP neuron (and default KV-group) criterion: ols (default) | nystrom | magnitude "
                                   "| activation")
    attn_criterion: str | None = option(None, "KV-group criterion (defaults to criterion)")
    target: str = option("sequential", "least-squares target: sequential (default) | original | parallel")
    # The refit is pulled towards the kept channels' own weights, 0.3 x the mean channel energy strong:
    # chosen by leave-one-domain-out cross-validation (benchmarks/domains.py, the left-out domain's calib
    # split); a refit that is free to fit the calibration text (1e-3 towards zero, the earlier default)
    # transfers badly to other text.
    ridge: float = option(0.3, "ridge strength relative to the mean channel energy (default 0.3)")
    ridge_prior: str = option("weights", "what the ridge pulls the refit towards: weights (the kept channels' own "
                                         "weights, default) | zero")
    qk_norm: str = option(QK_NORM_DEFAULT, "blocks whose q/k norms differ (Qwen3, Gemma 3): average (approximate, "
                                     "repaired by least squares; default) | exact (refuse)")

    def validate(self) -> None:
        super().validate()
        _choice("criterion", self.criterion, CRITERIA)
        if self.attn_criterion is not None:
            _choice("attn_criterion", self.attn_criterion, CRITERIA)
        _choice("target", self.target, TARGETS)
        _choice("qk_norm", self.qk_norm, QK_NORM_MODES)
        _choice("ridge_prior", self.ridge_prior, RIDGE_PRIORS)
        require(self.ridge >= 0, f"ridge must be >= 0, got {self.ridge}")

    def prune_settings(self, refit: bool = True) -> PruneSettings:
        return PruneSettings(
            self.criterion, self.attn_criterion, self.target, self.ridge, self.batch_size, self.qk_norm,
            self.ridge_prior, refit,
        )


# The options only the pruning stage reads (not the search): a plan's choice may be pruned another way.
PRUNING_OPTIONS = frozenset({"criterion", "attn_criterion", "target", "ridge", "ridge_prior"})


# Named recipes: `preset=paper` is FlattenGPT as the paper describes it (arXiv 2602.08858; no official
# code): pairs by the cosine of the pair's input and output, channels spanning the activation
# correlation (Nystrom), least squares toward the flattened block's own output with a plain ridge.
# `depthkit` (the defaults above) is the stronger reconstruction measured in benchmarks/domains.py.
PRESETS: dict[str, dict[str, Any]] = {
    "depthkit": {},
    "paper": {"selection": "similarity", "criterion": "nystrom", "target": "parallel", "ridge_prior": "zero",
              "ridge": 1e-3},
}


@dataclass
class FlattenOptions(PruneOptions, SearchOptions):
    """User options of the flatten methods (`selection_blocks`: the first N calibration sequences
    choose the pairs; least squares uses all of them). `preset` fills in a named recipe's options;
    setting one of them to another value as well is an error."""

    preset: str = option("depthkit", "named recipe: depthkit (the defaults) | paper (the paper's recipe: "
                                     "similarity pairs, Nystrom channels, refit to the flattened output)")

    selection: str = option("greedy", "pair selection: greedy (least calibration-loss increase, default) | local "
                            "(flattening error) | similarity (input/output cosine)")
    rescore: bool = option(True, "re-score the pairs after every flatten (default true); false: score every pair "
                                 "once on the original model (local or similarity, pairs only): cheaper, above all "
                                 "with --offload disk, where re-scoring reads the blocks again at every step")
    shortlist: int = option(8, "greedy: candidates (smallest local flattening error) whose loss is measured; "
                               "0 = all (default 8)")
    max_group: int = option(2, "most original blocks flattened into one block (default 2)")
    groups: list[list[int]] | None = option(None, "explicit groups of original block indices, e.g. [[0],[1,2],...]: "
                                                  "skips the selection")

    @classmethod
    def from_dict(cls, options: dict[str, Any], method: str = "") -> FlattenOptions:
        preset = options.get("preset", "depthkit")
        _choice("preset", preset, tuple(PRESETS))
        recipe = PRESETS[preset]
        conflicts = sorted(name for name in recipe if name in options and str(options[name]) != str(recipe[name]))
        require(not conflicts, f"{method} option(s) {', '.join(conflicts)} conflict with preset {preset}, which sets "
                               + ", ".join(f"{name}={recipe[name]}" for name in conflicts))
        return super().from_dict({**recipe, **options}, method)

    def validate(self) -> None:
        super().validate()
        _choice("selection", self.selection, SELECTIONS)
        require(self.rescore or (self.selection in ONE_PASS_SELECTIONS and self.max_group == 2),
                f"rescore=false scores disjoint pairs once: it needs selection {' or '.join(ONE_PASS_SELECTIONS)} "
                f"and max_group 2, got selection {self.selection}, max_group {self.max_group}")
        require(self.shortlist >= 0, f"shortlist must be >= 0, got {self.shortlist}")
        require(self.groups is None or (isinstance(self.groups, list) and all(
            isinstance(g, list) and g and all(isinstance(i, int) for i in g) for g in self.groups)),
            f"groups must be a JSON list of lists of block indices, e.g. [[0],[1,2],[3]], got {self.groups!r}")
        # what can be checked before the model is loaded (the block count is checked once it is known)
        require(self.max_group >= 2, f"max_group must be at least 2, got {self.max_group}")
        listed = sum(self.groups or [], [])
        require(listed == list(range(len(listed))),
                f"groups must list every block 0, 1, 2, ... once, in order, as consecutive runs, got {self.groups!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{name} must be one of {', '.join(choices)}, got '{value}'")


def check_groups(groups: list[list[int]], num_layers: int, num_remove: int) -> list[list[int]]:
    """Explicit `groups` that cover every block once, in order, and remove exactly `num_remove`."""
    groups = [[int(i) for i in g] for g in groups]
    require(
        sum(groups, []) == list(range(num_layers)),
        f"groups must list every block 0..{num_layers - 1} once, in order, as consecutive runs",
    )
    require(
        num_layers - len(groups) == num_remove,
        f"groups give {len(groups)} blocks but removing {num_remove} of {num_layers} needs {num_layers - num_remove}",
    )
    return groups


@torch.no_grad()
def flatten_gpt(
    model: PreTrainedModel | BlockSource,
    selection_ids: torch.Tensor,
    fit_ids: torch.Tensor,
    num_remove: int,
    options: FlattenOptions,
    prune: bool = True,
    progress: bool = True,
    sink: BlockSink | None = None,
) -> dict[str, Any]:
    """Compress by `num_remove` blocks (the search, then its apply); returns the details for the card.

    The blocks go to `sink` (a `StreamingWriter` for a checkpoint streamed from disk: each block is
    written as soon as it is fitted); without one, a model in memory is changed in place. The same
    options choose the same groups and weights either way, so a memory flag never changes the
    model. Streamed memory: one group's original blocks, its wide block, the selection sequences'
    states and the calibration activations.
    """
    if sink is None:
        require(isinstance(model, PreTrainedModel), "a streamed model's blocks need a sink to be written to")
        with ModelSink(model) as in_place:
            return flatten_gpt(model, selection_ids, fit_ids, num_remove, options, prune, progress, in_place)
    source = as_source(model)
    began = time.perf_counter()
    steps, _reuse = flatten_steps(source, selection_ids, num_remove, options, progress)
    selection = {"selection_tokens": int(selection_ids.numel()), "seconds_selection": time.perf_counter() - began}
    return apply_steps(source, steps, fit_ids, options, prune, sink, progress) | selection


def flatten_steps(
    source: BlockSource, selection_ids: torch.Tensor, num_remove: int, options: FlattenOptions, progress: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """The search: the flattens in the order chosen (`blocks`: the original blocks the flatten
    joins, `removes`, `score`) and how a plan of them is reused ("prefix"; "exact" for explicit
    `groups`, one step per group, unscored). Scored after every flatten (`select_groups`), or
    once (`one_pass_pairs`, `rescore` false)."""
    if options.groups is not None:
        groups = check_groups(options.groups, len(source.layers()), num_remove)
        return [{"blocks": group, "removes": len(group) - 1} for group in groups if len(group) > 1], "exact"
    if options.rescore:
        _groups, log = select_groups(source, selection_ids, num_remove, options.selection, options.max_group,
                                     options.batch_size, options.qk_norm, options.shortlist, progress)
    else:
        _groups, log = one_pass_pairs(source, selection_ids, num_remove, options.selection, options.batch_size,
                                      options.qk_norm, progress)
    return [{"blocks": entry["flattened"], "removes": 1, "score": entry["score"]} for entry in log], "prefix"


def groups_of(steps: list[dict[str, Any]], num_layers: int) -> list[list[int]]:
    """The groups of original blocks after `steps`, replayed from single blocks: each step joins the
    adjacent groups that make up its `blocks` (refused if none do: a damaged plan)."""
    groups = [[i] for i in range(num_layers)]
    for step in steps:
        blocks = step["blocks"]
        start = next((p for p, group in enumerate(groups) if group[0] == blocks[0]), len(groups))
        stop, joined = start, []
        while stop < len(groups) and len(joined) < len(blocks):
            joined += groups[stop]
            stop += 1
        require(joined == blocks and stop - start >= 2,
                f"the plan flattens blocks {blocks}, which are not adjacent groups of the model left by its earlier "
                "steps: the plan is damaged")
        groups[start:stop] = [list(blocks)]
    return groups


def apply_steps(
    source: BlockSource, steps: list[dict[str, Any]], fit_ids: torch.Tensor, options: FlattenOptions,
    prune: bool, sink: BlockSink, progress: bool = True,
) -> dict[str, Any]:
    """The apply: every group of `steps` flattened and (if `prune`) pruned back with least squares
    on `fit_ids`, the blocks written to `sink`; the card's details, less the search's (its tokens
    and time, which the plan holds)."""
    num_layers = len(source.layers())
    groups = groups_of(steps, num_layers)
    began = time.perf_counter()
    records = flatten_and_prune(source, groups, fit_ids, options.prune_settings(), sink, prune, progress)
    return {
        "options": dataclasses.asdict(options),
        "pruned": prune,
        "layers_before": num_layers,
        "layers_after": len(groups),
        "flattened_groups": [g for g in groups if len(g) > 1],
        "selection_log": [{"flattened": step["blocks"], "score": step["score"]} for step in steps if "score" in step],
        "blocks": records,
        "fit_tokens": int(fit_ids.numel()) if prune else 0,
        "seconds_prune": time.perf_counter() - began,
    }
