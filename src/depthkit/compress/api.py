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
from depthkit.compress.base import METHODS, blocks_to_remove, get_method
from depthkit.compress.common import count_parameters, num_blocks
from depthkit.data.blocks import DataSpec, sample_blocks, split_documents
from depthkit.data.corpora import DEFAULT_CALIB, mixture_components
from depthkit.errors import require, warn
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, json_text, write_json

CARD_JSON = "compression_card.json"
DEFAULT_CALIB_BLOCKS = 64
DEFAULT_CALIB_LEN = 256
CARD_MD = "compression_card.md"


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
    depthkit_version: str = depthkit.__version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_row(self) -> dict[str, Any]:
        """One table row: the figures a user compares between methods."""
        return {
            "method": self.method,
            "depth": f"{self.num_layers_before} -> {self.num_layers_after}",
            "params (M)": f"{self.parameters_before['total'] / 1e6:.2f} -> {self.parameters_after['total'] / 1e6:.2f}",
            "effective (M)": f"{self.parameters_after['effective'] / 1e6:.2f}",
            "seconds": round(self.seconds, 1),
        }


def compress(
    model: PreTrainedModel,
    method: str = "flatten",
    ratio: float | None = None,
    target_layers: int | None = None,
    calib_ids: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib: DataSpec | str = DEFAULT_CALIB,
    num_calib_blocks: int = DEFAULT_CALIB_BLOCKS,
    calib_block_len: int = DEFAULT_CALIB_LEN,
    **method_options: Any,
) -> CompressionReport:
    """Compress `model` in place by `ratio` of its blocks (or down to `target_layers` blocks).

    Calibration is `calib_ids` (sequences x tokens) when given, else `num_calib_blocks` blocks of
    `calib_block_len` tokens sampled over all of `calib` (a corpus or mixture name means its
    `calib` split; `sample_blocks`), tokenized with `tokenizer`. Everything a user can get wrong
    is checked before any work starts.
    """
    runner = get_method(method, **method_options)
    depth = num_blocks(model)
    num_remove = blocks_to_remove(depth, ratio, target_layers)
    calib_ids, calibration = _calibration(model.config, next(model.parameters()).device, calib_ids, tokenizer,
                                          calib, num_calib_blocks, calib_block_len)
    before = count_parameters(model)
    model.eval()
    began = time.perf_counter()
    with torch.no_grad():
        outcome = runner.compress(model, calib_ids, num_remove)
    seconds = time.perf_counter() - began
    return CompressionReport(
        method=method, options=dict(method_options), model=str(getattr(model, "name_or_path", "") or ""),
        num_layers_before=depth, num_layers_after=num_blocks(model), blocks_requested=num_remove,
        ratio=ratio, target_layers=target_layers, parameters_before=before,
        parameters_after=count_parameters(model), calibration=calibration, seconds=seconds,
        saveable=outcome.saveable, details=outcome.details, paper=runner.paper, deviations=runner.deviations(),
    )


def compress_checkpoint(
    model: str | Path,
    out: str | Path,
    method: str = "flatten",
    ratio: float | None = None,
    target_layers: int | None = None,
    calib_ids: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib: DataSpec | str = DEFAULT_CALIB,
    num_calib_blocks: int = DEFAULT_CALIB_BLOCKS,
    calib_block_len: int = DEFAULT_CALIB_LEN,
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
    compresses on one device. `out` appears only once complete, with its compression card.
    """
    from depthkit.models.loading import load_tokenizer, resolve_model_path
    from depthkit.models.streaming import StreamingModel, StreamingWriter, peak_memory_mb, return_freed_memory_to_os

    runner = get_method(method, **method_options)
    runner.require_streaming()
    check_output_dir(out, overwrite)
    return_freed_memory_to_os()
    folder = resolve_model_path(str(model))
    source = StreamingModel.open(folder, device=device, dtype=dtype)
    num_remove = blocks_to_remove(source.num_layers, ratio, target_layers)
    if calib_ids is None and tokenizer is None:
        tokenizer = load_tokenizer(folder)
    calib_ids, calibration = _calibration(source.config, source.device, calib_ids, tokenizer, calib,
                                          num_calib_blocks, calib_block_len)
    before = source.parameter_count()
    began = time.perf_counter()
    with StreamingWriter(out, source.config, overwrite=overwrite) as writer, \
            torch.no_grad():
        writer.write_non_layer(source)
        outcome = runner.compress_blocks(source, calib_ids, num_remove, writer)
        report = CompressionReport(
            method=method, options=dict(method_options), model=str(model), num_layers_before=source.num_layers,
            num_layers_after=writer.num_layers, blocks_requested=num_remove, ratio=ratio,
            target_layers=target_layers, parameters_before={"total": before, "effective": before},
            parameters_after={"total": writer.parameters, "effective": writer.effective_parameters},
            calibration=calibration, seconds=time.perf_counter() - began, saveable=True,
            details=outcome.details | {"offload": "disk", "peak_memory_mb": peak_memory_mb()},
            paper=runner.paper, deviations=runner.deviations(),
        )
        card = report.to_dict()
        writer.write_text(CARD_JSON, json_text(card))
        writer.write_text(CARD_MD, card_markdown(card))
    return report


def _calibration(
    config: PretrainedConfig,
    device: torch.device,
    calib_ids: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase | None,
    calib: DataSpec | str,
    num_blocks_: int,
    block_len: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration tokens (on the model's device) and how the card describes them."""
    if calib_ids is None:
        require(tokenizer is not None, "give calib_ids, or a tokenizer to tokenize the calibration text")
        spec = calib if isinstance(calib, DataSpec) else DataSpec(calib, "calib")
        calib_ids = sample_blocks(tokenizer, spec, num_blocks_, block_len)
        source = spec.describe()
        extra = {"corpora": mixture_components(spec.corpus),
                 "sampling": "blocks spread over every document, corpora of a mixture in equal shares"}
        if len(split_documents(spec.corpus, spec.split)) == 1:
            warn(f"all calibration text comes from one document ({spec.corpus}); what the method fits may not "
                 f"transfer to other text (the default, {DEFAULT_CALIB}, samples every offline domain)")
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


def _requested(card: dict[str, Any]) -> str:
    how = f"ratio {card['ratio']}" if card["ratio"] is not None else f"target {card['target_layers']} blocks"
    return f"{how}: {card['blocks_requested']} blocks"
