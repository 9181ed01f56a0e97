"""`depthkit.compress(...)` and `save_compressed(...)`: run a registered method with validated input,
measure what it did, and save the result as a plain Hugging Face checkpoint with a card.

The card (`compression_card.json` + `.md`) is what makes a compressed checkpoint reproducible:
method and options, which original blocks were removed or merged, how much calibration text was
used, parameter counts and depth before/after, wall time and the depthkit version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

import depthkit
from depthkit.compress.base import METHODS, CompressionMethod, blocks_to_remove, get_method, method_for_plan
from depthkit.compress.common import count_parameters, num_blocks
from depthkit.compress.plan import CompressionPlan
from depthkit.data.blocks import DataSpec, sample_blocks, split_documents
from depthkit.data.corpora import DEFAULT_CALIB, MIX_COMPONENTS, mixture_components, mixture_sources
from depthkit.errors import require, warn
from depthkit.models.runner import BlockSink, BlockSource, InMemoryModel, ModelSink
from depthkit.utils.io import (
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    format_table,
    json_text,
    write_json,
)

CARD_JSON = "compression_card.json"
DEFAULT_CALIB_BLOCKS = 64
DEFAULT_CALIB_LEN = 256
CARD_MD = "compression_card.md"
DEFAULT_METHOD = "flatten"


@dataclass
class CompressionReport:
    """What a compression run did; `to_dict()` is the compression card."""

    method: str
    options: dict[str, Any]
    model: str
    num_layers_before: int
    num_layers_after: int
    blocks_requested: int
    ratio: float | None
    target_layers: int | None
    parameters_before: dict[str, int]
    parameters_after: dict[str, int]
    calibration: dict[str, Any]
    seconds: float
    saveable: bool
    details: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    deviations: list[str] = field(default_factory=list)
    # "searched" (this run's search), or where the plan it applied came from (a file, or "given")
    plan_source: str = "searched"
    plan: dict[str, Any] | None = None  # the plan applied (`CompressionPlan.from_dict` reads it back)
    depthkit_version: str = depthkit.__version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shortfall(self) -> str | None:
        """"reached N blocks, not M" when the method stopped short of the depth asked for (LaCo stops
        at its threshold); None otherwise, and for width methods, which keep every block by design."""
        if self.details.get("target_reached") is not False:
            return None
        return f"reached {self.num_layers_after} blocks, not {self.num_layers_before - self.blocks_requested}"

    def applied_plan(self) -> CompressionPlan:
        """The plan this run applied, to apply again (another count it serves, other fitting options)."""
        require(self.plan is not None, "this report records no plan")
        return CompressionPlan.from_dict(self.plan)

    def summary_row(self) -> dict[str, Any]:
        """One table row: the figures a user compares between methods."""
        return {
            "method": self.method,
            "depth": f"{self.num_layers_before} -> {self.num_layers_after}",
            "params (M)": f"{self.parameters_before['total'] / 1e6:.2f} -> {self.parameters_after['total'] / 1e6:.2f}",
            "effective (M)": f"{self.parameters_after['effective'] / 1e6:.2f}",
            "seconds": round(self.seconds, 1),
        }


class CompressionJob:
    """One compression, checked before any work: the method and its options, the plan to apply (or
    none: search one), how many blocks go. `compress`, `compress_checkpoint` and the command line
    all build one, so each check, the search-or-plan choice and the card are written once; the
    entry points differ only in the model's backend (its block source and sink).
    """

    def __init__(self, method: str | None, options: dict[str, Any], plan: CompressionPlan | str | Path | None = None,
                 save_plan: str | Path | None = None) -> None:
        """Checks what needs no model: the method, its options, the plan file and whether its
        options agree, and that `save_plan` can be written."""
        if isinstance(plan, (str, Path)):
            self.plan, self.plan_source = CompressionPlan.load(plan), f"file {plan}"
        else:
            self.plan, self.plan_source = plan, ("searched" if plan is None else "given")
        require(self.plan is None or save_plan is None,
                "`save_plan` saves the plan a search chose; with a plan given nothing is searched")
        if self.plan is None:
            self.runner = get_method(method or DEFAULT_METHOD, **options)
        else:
            self.runner = method_for_plan(self.plan, method, options)
        self.save_plan = None if save_plan is None else check_output_file(save_plan)
        self.num_layers = self.num_remove = 0  # set by `for_depth`, with the ratio or target asked
        self.ratio: float | None = None
        self.target_layers: int | None = None

    def for_depth(self, num_layers: int, ratio: float | None, target_layers: int | None) -> int:
        """Checks what needs the model's depth (from its config: before any weight is loaded): the
        blocks to remove, the method's depth-dependent options, and that the plan serves them."""
        self.num_layers, self.ratio, self.target_layers = num_layers, ratio, target_layers
        self.num_remove = blocks_to_remove(num_layers, ratio, target_layers)
        if self.plan is not None:  # first: a plan's own options are checked against its count below
            self.runner.check_plan(self.plan, num_layers, self.num_remove)
        self.runner.check_depth(num_layers, self.num_remove)
        return self.num_remove

    @torch.no_grad()
    def run(
        self, source: BlockSource, sink: BlockSink, calib_ids: torch.Tensor, calibration: dict[str, Any],
        model: str, parameters_before: dict[str, int],
    ) -> CompressionReport:
        """Search (unless a plan was given; a searched plan is saved before it is applied, so a failed
        apply keeps it), apply, and the report, less what the backend knows once its sink is
        finished (the caller sets `num_layers_after` and `parameters_after`)."""
        began = time.perf_counter()
        plan = self.plan
        if plan is None:
            plan = self.runner.search(source, calib_ids, self.num_remove)
            plan.model = model
            if self.save_plan is not None:
                plan.save(self.save_plan)
        outcome = self.runner.apply(source, plan, calib_ids, self.num_remove, sink)
        return CompressionReport(
            method=self.runner.name, options=dict(self.runner.options), model=model,
            num_layers_before=self.num_layers, num_layers_after=0, blocks_requested=self.num_remove,
            ratio=self.ratio, target_layers=self.target_layers, parameters_before=parameters_before,
            parameters_after={}, calibration=calibration, seconds=time.perf_counter() - began,
            saveable=outcome.saveable, details=outcome.details,
            paper=self.runner.paper, deviations=self.runner.deviations(), plan_source=self.plan_source,
            plan=plan.to_dict(),
        )


def compress(
    model: PreTrainedModel,
    method: str | None = None,
    ratio: float | None = None,
    target_layers: int | None = None,
    calib_ids: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib: DataSpec | str = DEFAULT_CALIB,
    num_calib_blocks: int = DEFAULT_CALIB_BLOCKS,
    calib_block_len: int = DEFAULT_CALIB_LEN,
    plan: CompressionPlan | str | Path | None = None,
    save_plan: str | Path | None = None,
    **method_options: Any,
) -> CompressionReport:
    """Compress `model` in place by `ratio` of its blocks (or down to `target_layers` blocks).

    `method` defaults to flatten, or to the method of `plan`: a `CompressionPlan` or the path of
    one (`save_plan`, a card's `plan`), applied without searching; options not given are the
    plan's. `save_plan` writes the plan this run's search chooses. Calibration is `calib_ids`
    (sequences x tokens) when given, else `num_calib_blocks` blocks of `calib_block_len` tokens
    sampled over all of `calib` (a corpus or mixture name means its `calib` split;
    `sample_blocks`), tokenized with `tokenizer`. Everything a user can get wrong is checked
    before any work starts.
    """
    job = CompressionJob(method, method_options, plan, save_plan)
    job.for_depth(num_blocks(model), ratio, target_layers)
    calib_ids, calibration = _calibration(model.config, next(model.parameters()).device, calib_ids, tokenizer,
                                          calib, num_calib_blocks, calib_block_len, job.runner)
    model.eval()
    with ModelSink(model) as sink:
        report = job.run(InMemoryModel(model), sink, calib_ids, calibration,
                         str(getattr(model, "name_or_path", "") or ""), count_parameters(model))
    report.num_layers_after, report.parameters_after = num_blocks(model), count_parameters(model)
    return report


def compress_checkpoint(
    model: str | Path,
    out: str | Path,
    method: str | None = None,
    ratio: float | None = None,
    target_layers: int | None = None,
    calib_ids: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib: DataSpec | str = DEFAULT_CALIB,
    num_calib_blocks: int = DEFAULT_CALIB_BLOCKS,
    calib_block_len: int = DEFAULT_CALIB_LEN,
    plan: CompressionPlan | str | Path | None = None,
    save_plan: str | Path | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    **method_options: Any,
) -> CompressionReport:
    """Compress a checkpoint folder into `out` without ever holding the whole model (`--offload disk`).

    Blocks are read one at a time from the memory-mapped safetensors files and the new blocks are
    written as they are produced (`StreamingModel`, `StreamingWriter`): peak memory is a few blocks
    (one for ShortGPT, SLEB, attention drop and width pruning, a pair and its wide block for
    FlattenGPT, the blocks of one merge for LaCo) plus the calibration activations (for the SLEB and LaCo searches,
    the cached states of their selection sequences), so a model larger than RAM (or GPU memory)
    compresses on one device. `out` appears only once complete, with its compression card. The
    method, plan and calibration arguments are `compress`'s.
    """
    from depthkit.models.loading import load_tokenizer, resolve_model_path
    from depthkit.models.streaming import StreamingModel, StreamingWriter, peak_memory_mb, return_freed_memory_to_os

    job = CompressionJob(method, method_options, plan, save_plan)
    job.runner.require_streaming()
    check_output_dir(out, overwrite)
    return_freed_memory_to_os()
    folder = resolve_model_path(str(model))
    source = StreamingModel.open(folder, device=device, dtype=dtype)
    job.for_depth(source.num_layers, ratio, target_layers)
    if calib_ids is None and tokenizer is None:
        tokenizer = load_tokenizer(folder)
    calib_ids, calibration = _calibration(source.config, source.device, calib_ids, tokenizer, calib,
                                          num_calib_blocks, calib_block_len, job.runner)
    before = source.parameter_count()
    with StreamingWriter(out, source.config, overwrite=overwrite) as writer:
        writer.write_non_layer(source)
        report = job.run(source, writer, calib_ids, calibration, str(model), {"total": before, "effective": before})
        report.num_layers_after = writer.num_layers
        report.parameters_after = {"total": writer.parameters, "effective": writer.effective_parameters}
        report.details |= {"offload": "disk", "peak_memory_mb": peak_memory_mb()}
        card = report.to_dict()
        writer.write_text(CARD_JSON, json_text(card))
        writer.write_text(CARD_MD, card_markdown(card))
    return report


def _warn_if_narrow(spec: DataSpec, method: CompressionMethod) -> None:
    """One warning line where calibration text is narrower than what it calibrates: one document,
    or, for a method that refits weights, one corpus (FlattenGPT and width pruning calibrated on one
    domain are worse than SLEB on the others on average, benchmarks/results/domains_single.md)."""
    offline = all(source in MIX_COMPONENTS for source in mixture_sources(spec.corpus))
    wider = DEFAULT_CALIB if offline else f"{spec.corpus}+{DEFAULT_CALIB}"
    if len(split_documents(spec.corpus, spec.split)) == 1:
        warn(f"all calibration text comes from one document ({spec.corpus}); what the method fits may not "
             f"transfer to other text; calibrate on a mixture, e.g. --calib {wider}")
    elif method.refits_weights and len(mixture_components(spec.corpus)) == 1:
        warn(f"{method.name} refits weights to the calibration text, all of it from one corpus ({spec.corpus}): "
             f"on other text the result may be worse than plain block removal; calibrate on a mixture, "
             f"e.g. --calib {wider}")


def _calibration(
    config: PretrainedConfig,
    device: torch.device,
    calib_ids: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase | None,
    calib: DataSpec | str,
    num_blocks_: int,
    block_len: int,
    method: CompressionMethod,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration tokens (on the model's device) and how the card describes them; a warning
    where the text is too narrow for what `method` fits."""
    if calib_ids is None:
        require(tokenizer is not None, "give calib_ids, or a tokenizer to tokenize the calibration text")
        spec = calib if isinstance(calib, DataSpec) else DataSpec(calib, "calib")
        calib_ids = sample_blocks(tokenizer, spec, num_blocks_, block_len)
        source = spec.describe()
        extra = {"corpora": mixture_components(spec.corpus),
                 "sampling": "blocks spread over every document, corpora of a mixture in equal shares"}
        _warn_if_narrow(spec, method)
    else:
        source, extra = "token ids given by the caller", {}
    require(calib_ids.dim() == 2 and not calib_ids.is_floating_point(),
            f"calib_ids must be a 2-D tensor of token ids (sequences x tokens), got shape {tuple(calib_ids.shape)}")
    require(calib_ids.shape[1] >= 2, f"calibration sequences need at least 2 tokens, got {calib_ids.shape[1]}")
    vocab = config.vocab_size
    require(int(calib_ids.min()) >= 0 and int(calib_ids.max()) < vocab,
            f"calibration token ids must be in 0..{vocab - 1} for this model")
    sequences, length = calib_ids.shape
    return calib_ids.to(device), {"data": source, "sequences": sequences, "tokens_per_sequence": length, **extra}


def list_methods() -> list[dict[str, str]]:
    """Every registered method with its description and options (for `depthkit compress --list`)."""
    return [{"method": name, "description": cls.description, "options": ", ".join(sorted(cls.option_help()))}
            for name, cls in sorted(METHODS.items())]


def save_compressed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path,
    card: CompressionReport | dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Save a plain `save_pretrained` checkpoint, the tokenizer and the compression card, atomically.

    Results that are not standard checkpoints (`saveable` false, e.g. unpruned double-width
    flattened blocks) are refused: they would not reload as the model that was measured.
    """
    card = card.to_dict() if isinstance(card, CompressionReport) else dict(card)
    require(card.get("saveable", True),
            f"method '{card.get('method')}' does not produce a standard checkpoint; it can be evaluated "
            "in memory but not saved")
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / CARD_JSON, card)
        (tmp / CARD_MD).write_text(card_markdown(card))
    return out


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a readable page: the key figures as a table, the method's details as JSON."""
    before, after = card["parameters_before"], card["parameters_after"]
    rows = [
        {"field": "method", "value": card["method"]},
        {"field": "options", "value": json.dumps(card["options"]) if card["options"] else "(defaults)"},
        {"field": "source model", "value": card["model"] or "(in memory)"},
        {"field": "depth", "value": f"{card['num_layers_before']} -> {card['num_layers_after']} blocks"},
        {"field": "requested", "value": _requested(card)},
        {"field": "parameters", "value": f"{before['total']:,} -> {after['total']:,}"},
        {"field": "effective parameters", "value": f"{before['effective']:,} -> {after['effective']:,}"},
        {"field": "calibration", "value": "{data}, {sequences} x {tokens_per_sequence} tokens".format(
            **card["calibration"])},
        *([{"field": "plan", "value": _plan_line(card)}] if card.get("plan") else []),
        {"field": "paper", "value": card.get("paper") or "(depthkit's own method)"},
        {"field": "wall time", "value": f"{card['seconds']:.1f} s"},
        {"field": "depthkit", "value": card["depthkit_version"]},
    ]
    warning = card["details"].get("warning")
    lines = [f"# Compression card: {card['method']}", ""]
    if warning:
        lines += [f"> **WARNING: {warning}.**", ""]
    lines += [format_table(rows), ""]
    if card.get("deviations"):
        lines += ["## Deviations from the paper and its authors' code", "",
                  *(f"- {line}" for line in card["deviations"]), ""]
    lines += ["## Method details", "", "```json",
              json_text(card["details"]).rstrip(), "```", ""]
    return "\n".join(lines)


def _plan_line(card: dict[str, Any]) -> str:
    plan = card["plan"]
    return f"{card['plan_source']}: {len(plan['steps'])} steps for {plan['num_remove']} blocks, reuse {plan['reuse']}"


def _requested(card: dict[str, Any]) -> str:
    how = f"ratio {card['ratio']}" if card["ratio"] is not None else f"target {card['target_layers']} blocks"
    return f"{how}: {card['blocks_requested']} blocks"
