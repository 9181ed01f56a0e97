"""Flatten the selected groups and prune every wide block back to the original widths.

Blocks are processed front to back on the least-squares calibration tokens, carrying the hidden
state of the ALREADY COMPRESSED model, so each block is fitted on the inputs it will really see
and later blocks compensate earlier errors (error propagation).

For a group of original blocks g_1..g_k on input x, the ridge targets are (option `target`):

- `sequential` (default): what the original blocks compute one after the other on x. The
  attention target is the sum of the blocks' attention updates along that sequential path; the
  MLP target is the sequential output minus the pruned attention's actual output y. Pruning then
  also repairs the flattening error (parallel vs sequential) and the attention pruning error.
- `original`: the same, but from the original model's own hidden state at that depth, so that
  each block also pulls the stream back towards the uncompressed model.
- `parallel`: the unpruned flattened block's output (what pruning alone loses).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import relative_error
from depthkit.compress.flatten.channels import GramAccumulator, ridge_lambda, select_units
from depthkit.compress.flatten.merge import flatten_layers
from depthkit.errors import require
from depthkit.models.adapters import ArchitectureAdapter, get_adapter
from depthkit.models.runner import BlockRunner, BlockSink, BlockSource

TARGETS = ("sequential", "original", "parallel")
RIDGE_PRIORS = ("zero", "weights")


@dataclass
class PruneSettings:
    """How wide blocks are pruned and refit (defaults and help: `FlattenOptions`, the one place)."""

    criterion: str
    attn_criterion: str | None  # None: the same as `criterion`
    target: str
    ridge: float
    batch_size: int
    qk_norm: str
    ridge_prior: str
    refit: bool = True  # False: keep the chosen channels' weights as they are (no least squares)


@dataclass(frozen=True)
class Widths:
    """What a pruned block keeps: KV groups, query heads per kept group, MLP neurons."""

    kv_groups: int
    heads_per_group: int
    neurons: int


def gram_of_input(module: nn.Module, run: Callable[[], object],
                  target: Callable[[int, int, torch.Tensor], torch.Tensor], sequences: int) -> GramAccumulator:
    """Gram statistics of the channels entering `module` (an output projection) during `run()`,
    against the target rows `target(start, stop, channels)` of those sequences (in the order `run`
    goes; `channels`: what enters the projection for them).

    Accumulated call by call, and the float32 target built for each call's rows only, so neither
    the wide channel activations nor a float copy of the target ever exist for all calibration
    tokens at once: memory is one batch of them plus C and R.
    """
    gram, seen = GramAccumulator(), [0]

    def add(_module, args) -> None:
        rows, channels = args[0].shape[0], args[0].detach()
        gram.add(channels, target(seen[0], seen[0] + rows, channels))
        seen[0] += rows

    handle = module.register_forward_pre_hook(add)
    try:
        run()
    finally:
        handle.remove()
    require(seen[0] == sequences, f"saw {seen[0]} sequences for a target of {sequences}")
    return gram


def _refit(linear: nn.Linear, gram: GramAccumulator, rows: torch.Tensor, lam: float, prior: str) -> None:
    """Replace `linear` input columns by the ridge solution on the kept channels `rows` (frees `gram`),
    pulled towards zero or towards those columns' own weights (`prior`)."""
    start = linear.weight.detach()[:, rows].double() if prior == "weights" else None
    weight = gram.solve_and_free(rows, lam, start)
    linear.in_features = len(rows)
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.out_features = len(rows)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=False)


def _bias(linear: nn.Linear) -> torch.Tensor | float:
    return linear.bias.detach().float() if linear.bias is not None else 0.0


def _zeros_to_one(gain: torch.Tensor) -> torch.Tensor:
    """`gain` with its zeros replaced by 1, to divide by (the zero channels are masked by the caller)."""
    return torch.where(gain != 0, gain, 1.0)


class _OutputFit:
    """The least-squares target of an output projection, whose output a post-norm may follow.

    Pre-norm blocks: the projection's output must equal the branch target T (minus its bias).
    Post-norm blocks (Gemma) add `G * v / rms(v)`, `v` the projection's output: the per-token scale
    of `v` is lost, its direction is what counts. The target is `rms(v) T / G` per token, `v` what
    the block computes now (rms with the norm's epsilon, which matters for small outputs): for a
    block whose output already gives T this is `v` itself, so an unpruned block refits to itself
    and the ridge's pull towards the current weights agrees with the target. A channel whose gain
    is 0 adds nothing to the output but still counts in rms(v): its target is its current output.

    A single original block keeps its gain: it is right. A flattened block's merged gain is only
    a guess (`merge.py`), so `regain` replaces it by the per-channel RMS of T over the calibration
    tokens, as stored (a `(1 + w)` gain in bf16 is coarse near 0), and scales the projection's rows
    by old gain / new gain, the prior that gives the same `G * v` as before. Gemma's post-norm
    gains span 0 to several hundred: a fit in another scale than the norm's costs more than all the
    pruning does (width pruning of the real Gemma 3 was worse than no refit at all).
    """

    def __init__(self, linear: nn.Linear, post_norm: nn.Module | None, rows: Callable[[int, int], torch.Tensor],
                 sequences: int, adapter: ArchitectureAdapter, refit: bool = True, regain: bool = False):
        """`rows(start, stop)`: the float32 branch target of those calibration sequences. Without
        `refit` nothing is fitted and nothing changes."""
        self.linear, self.rows = linear, rows
        self.gain, self.row_scale, self.eps = None, None, 0.0
        if post_norm is not None and refit:
            self.eps = adapter.norm_eps(post_norm)
            self.gain = adapter.norm_gain(post_norm)
            if regain:
                self._regain(post_norm, adapter, sequences)

    @torch.no_grad()
    def _regain(self, post_norm: nn.Module, adapter: ArchitectureAdapter, sequences: int) -> None:
        energy, tokens = 0.0, 0
        for start in range(0, sequences, 8):  # a few sequences at a time: never a float copy of all
            chunk = self.rows(start, min(start + 8, sequences))
            energy = energy + chunk.pow(2).sum(dim=(0, 1))
            tokens += chunk.shape[0] * chunk.shape[1]
        rms = (energy / tokens).sqrt()
        adapter.set_norm_gain(post_norm, torch.where(rms > 1e-6, rms, self.gain))
        new = adapter.norm_gain(post_norm)
        self.row_scale = torch.where(new != 0, self.gain / _zeros_to_one(new), 1.0)
        self.linear.weight.copy_((self.linear.weight.float() * self.row_scale[:, None]).to(self.linear.weight.dtype))
        if self.linear.bias is not None:
            self.linear.bias.copy_((self.linear.bias.float() * self.row_scale).to(self.linear.bias.dtype))
        self.gain = new

    def target(self, start: int, stop: int, channels: torch.Tensor) -> torch.Tensor:
        """The target of the projection's weight (bias left out) for these sequences."""
        rows, bias = self.rows(start, stop), _bias(self.linear)
        if self.gain is None:
            return rows - bias
        current = channels.float() @ self.linear.weight.detach().float().T + bias
        before = current if self.row_scale is None else current / self.row_scale  # what the block computes
        scale = (before.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return torch.where(self.gain != 0, scale * rows / _zeros_to_one(self.gain), current) - bias


class GroupPruner:
    """Prunes one (possibly wide) block, attention then MLP, given its input and its targets.

    The block keeps `Widths`: by default the original model's (a flattened block back to one
    block's width); width pruning asks for fewer query heads per KV group and fewer neurons.
    """

    def __init__(self, model: PreTrainedModel, runner: BlockRunner, settings: PruneSettings):
        self.model, self.runner, self.settings = model, runner, settings
        self.adapter = get_adapter(model)
        config = model.config
        self.heads_per_group = self.adapter.num_heads(config) // self.adapter.num_kv_heads(config)
        self.head_dim = self.adapter.head_dim(config)
        self.original = Widths(self.adapter.num_kv_heads(config), self.heads_per_group,
                               self.adapter.intermediate_size(config))

    def _select(self, gram: GramAccumulator, fit: _OutputFit, units: list[torch.Tensor], keep: int,
                criterion: str, lam: float) -> list[int]:
        """All units when all are kept, else the `keep` best by `criterion`, each output channel
        weighted by its post-norm gain (if any), as its error reaches the block's output."""
        if keep >= len(units):
            return list(range(len(units)))
        weight, R = fit.linear.weight.detach(), gram.R
        if fit.gain is not None:
            scale = fit.gain.abs()
            weight, R = weight.float() * scale[:, None], R * scale.to(R.dtype)
        return select_units(gram.C, R, weight, units, keep, criterion, lam)

    def prune_attention(self, wide: nn.Module, x: torch.Tensor, attn_target: torch.Tensor, widths: Widths,
                        regain: bool = False) -> dict:
        """Prune the attention to `widths` and refit its output projection (`regain`: a flattened
        block's post-norm gain is refit too, see `_OutputFit`)."""
        parts = self.adapter.block(wide)
        fit = _OutputFit(parts.attn_out, parts.attn_post_norm, lambda start, stop: attn_target[start:stop],
                         len(x), self.adapter, self.settings.refit, regain)
        gram = gram_of_input(parts.attn_out, lambda: self.runner.attention(wide, x), fit.target, len(x))
        head_dim, per_group = self.head_dim, self.heads_per_group
        group_cols = per_group * head_dim
        groups = [torch.arange(g * group_cols, (g + 1) * group_cols) for g in range(gram.C.shape[0] // group_cols)]
        lam = ridge_lambda(gram.C, self.settings.ridge)
        criterion = self.settings.attn_criterion or self.settings.criterion
        kept = self._select(gram, fit, groups, widths.kv_groups, criterion, lam)
        heads = {}
        for g in kept:  # query heads within each kept group (all of them unless width pruning asks fewer)
            units = [groups[g][h * head_dim : (h + 1) * head_dim] for h in range(per_group)]
            heads[g] = self._select(gram, fit, units, widths.heads_per_group, criterion, lam)
        columns = torch.cat([groups[g][h * head_dim : (h + 1) * head_dim] for g in kept for h in heads[g]])
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in kept])
        _keep_rows(parts.query, columns)  # query rows of a kept head = attn_out columns of that head
        _keep_rows(parts.key, kv_rows)
        _keep_rows(parts.value, kv_rows)
        self._fit_output(parts.attn_out, gram, columns, lam)
        self.adapter.set_heads_per_group(wide, widths.heads_per_group)
        details = {"kept_kv_groups": kept}
        if widths.heads_per_group < per_group:
            details["kept_heads"] = {str(g): heads[g] for g in kept}
        return details

    def prune_mlp(self, wide: nn.Module, y: torch.Tensor, goal: torch.Tensor, widths: Widths,
                  regain: bool = False) -> dict:
        """Prune the MLP, whose input is y (x + pruned attention) and target `goal - y`."""
        parts = self.adapter.block(wide)
        fit = _OutputFit(parts.mlp_out, parts.mlp_post_norm,
                         lambda start, stop: goal[start:stop].float() - y[start:stop].float(), len(y), self.adapter,
                         self.settings.refit, regain)
        gram = gram_of_input(parts.mlp_out, lambda: self.runner.mlp(wide, y), fit.target, len(y))
        units = list(torch.arange(gram.C.shape[0]).unsqueeze(1))
        lam = ridge_lambda(gram.C, self.settings.ridge)
        kept = torch.tensor(
            self._select(gram, fit, units, widths.neurons, self.settings.criterion, lam)
        )
        _keep_rows(parts.gate, kept)
        _keep_rows(parts.up, kept)
        self._fit_output(parts.mlp_out, gram, kept, lam)
        return {"kept_neurons_from_first_block": int((kept < self.original.neurons).sum())}

    def _fit_output(self, linear: nn.Linear, gram: GramAccumulator, columns: torch.Tensor, lam: float) -> None:
        """The output projection on the kept channels: refit by ridge least squares, or just kept."""
        if self.settings.refit:
            _refit(linear, gram, columns, lam, self.settings.ridge_prior)
        else:
            linear.in_features = len(columns)
            linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone(), requires_grad=False)

    def prune(self, layers: list[nn.Module], x: torch.Tensor, x_ref: torch.Tensor | None,
              widths: Widths | None = None) -> tuple[nn.Module, dict]:
        """The pruned block replacing `layers` (one block, or a group flattened first) on input x
        (x_ref: original model's state), keeping `widths` (default: the original block's)."""
        widths = widths or self.original
        wide = flatten_layers(self.model, layers, self.settings.qk_norm) if len(layers) > 1 else copy.deepcopy(
            layers[0])
        if self.settings.target == "parallel":
            attn_goal = self.runner.attention(wide, x).float()
            goal = self.runner.block(wide, x)
        else:
            source = x_ref if self.settings.target == "original" else x
            attn_goal, goal = self.runner.sequential(layers, source)
            if source is not x:
                attn_goal += source.float() - x.float()
        flatten_error = relative_error(self.runner.block(wide, x), goal, x)
        flattened = len(layers) > 1
        details = self.prune_attention(wide, x, attn_goal, widths, flattened)
        del attn_goal  # float32, as large as two bf16 activations: not needed for the MLP
        y = x + self.runner.attention(wide, x)
        details |= self.prune_mlp(wide, y, goal, widths, flattened)
        details |= {
            "flatten_error": flatten_error,
            "pruned_error": relative_error(self.runner.block(wide, x), goal, x),
        }
        return wide, details


@torch.no_grad()
def flatten_and_prune(
    source: BlockSource,
    groups: list[list[int]],
    fit_ids: torch.Tensor,
    settings: PruneSettings,
    sink: BlockSink,
    prune: bool = True,
    progress: bool = True,
    widths: Widths | None = None,
    propagate: bool = True,
) -> list[dict]:
    """Write the compressed blocks to `sink` in order: every group of 2+ blocks flattened (and, if
    `prune`, pruned), the others as they are; with `widths` (and `propagate`), every block pruned
    to them as `pruned_blocks` says.

    Returns one record per flattened group: original indices and, when pruned, kept channels and
    the relative errors (squared error over the squared block update) of the unpruned and pruned block.
    """
    if prune:
        blocks = pruned_blocks(source, groups, fit_ids, settings, progress, widths, propagate)
    else:
        blocks = _flattened_blocks(source, groups, settings.qk_norm)
    records = []
    for index, (block, record) in enumerate(blocks):
        sink.write_layer(index, block)
        if record is not None:
            records.append(record)
    return records


def _flattened_blocks(
    source: BlockSource, groups: list[list[int]], qk_norm: str
) -> Iterator[tuple[nn.Module, dict | None]]:
    """Every group of 2+ blocks flattened into one wide block, unpruned (an upper bound)."""
    layers = source.layers()
    _check_partition(groups, len(layers))
    for group in groups:
        if len(group) == 1:
            yield layers[group[0]], None
        else:
            yield flatten_layers(source.model, [layers[i] for i in group], qk_norm), {"group": group}


@torch.no_grad()
def pruned_blocks(
    source: BlockSource,
    groups: list[list[int]],
    fit_ids: torch.Tensor,
    settings: PruneSettings,
    progress: bool = True,
    widths: Widths | None = None,
    propagate: bool = True,
) -> Iterator[tuple[nn.Module, dict | None]]:
    """The compressed blocks in order, each with its record (None for blocks kept as they are).

    With `widths` every block, single ones too, is pruned to those widths (width pruning);
    without, only groups of 2+ blocks are flattened and pruned back to the original widths.
    `propagate=False` feeds every block the ORIGINAL model's state instead of the compressed
    model's (importance measured once on the original, as one-shot methods do).

    Original block i is read only while its group is processed, so a streamed source holds the
    current group, its wide block and the calibration activations, whatever the model size.
    """
    require(settings.target in TARGETS, f"target must be one of {', '.join(TARGETS)}, got '{settings.target}'")
    layers = source.layers()
    _check_partition(groups, len(layers))
    x = source.embed(fit_ids)
    runner = BlockRunner(source.model, x, settings.batch_size)
    pruner = GroupPruner(source.model, runner, settings)
    x_ref = x if settings.target == "original" else None
    for group in tqdm(groups, desc="flatten + prune" if widths is None else "prune", disable=not progress):
        originals = [layers[i] for i in group]
        if len(group) == 1 and widths is None:
            block, record = originals[0], None
        else:
            block, details = pruner.prune(originals, x, x_ref, widths)
            record = {"group": group} | details
        if x_ref is not None:
            x_ref = runner.sequential(originals, x_ref)[1]
        x = runner.block(block, x) if propagate else runner.sequential(originals, x)[1]
        yield block, record


def _check_partition(groups: list[list[int]], num_layers: int) -> None:
    require(sorted(sum(groups, [])) == list(range(num_layers)), "groups must partition the blocks in order")
