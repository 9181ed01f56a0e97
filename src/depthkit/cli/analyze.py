"""`depthkit analyze`: where is the model's depth redundant? JSON + PNG figures."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from depthkit.analysis.plots import plot_cka, plot_depth_curves
from depthkit.analysis.redundancy import RedundancyReport, analyze_redundancy
from depthkit.cli.common import add_data_args, add_model_args, data_spec, positive_int
from depthkit.data.blocks import DataSpec, sample_blocks, token_blocks
from depthkit.data.corpora import DEFAULT_CALIB
from depthkit.models.loading import load_model, load_tokenizer, resolve_model_path
from depthkit.models.runner import BlockSource, InMemoryModel
from depthkit.models.streaming import StreamingModel
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json

HELP = "block influence, angular distance and CKA per layer"


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help=HELP)
    add_model_args(parser)
    add_data_args(parser, split="calib", default=DEFAULT_CALIB)
    parser.add_argument("--num-blocks", type=positive_int, default=16, help="calibration sequences")
    parser.add_argument("--block-len", type=positive_int, default=256, help="tokens per sequence")
    parser.add_argument("--sample-tokens", type=positive_int, default=2048, help="tokens kept per layer for CKA")
    parser.add_argument("--offload", choices=("none", "disk"), default="none",
                        help="disk: read the checkpoint's blocks one at a time from its safetensors files "
                             "(memory ~ one block plus the activations)")
    parser.add_argument("--out", default="runs/analyze", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder depthkit wrote")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    source, tokenizer = open_model(args)
    spec = data_spec(args)
    ids = analysis_blocks(tokenizer, spec, args.num_blocks, args.block_len).to(args.device)
    result = analyze_redundancy(source, ids, sample_tokens=args.sample_tokens)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_analysis(result, tmp, title=f"{args.model} on {spec.describe()}",
                       meta={"model": args.model, "data": spec.describe(), "dtype": args.dtype})
    print(summary_table(result))
    print(f"wrote {Path(args.out) / 'analysis.json'}, cka.png, depth.png")


def open_model(args: argparse.Namespace) -> tuple[BlockSource, PreTrainedTokenizerBase]:
    """The model as a block source: in memory, or (`--offload disk`) streamed from its checkpoint so
    that a model larger than memory can be analysed one block at a time, as `compress` does."""
    if args.offload == "disk":
        folder = resolve_model_path(args.model)
        return StreamingModel.open(folder, device=args.device, dtype=args.dtype), load_tokenizer(folder)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    return InMemoryModel(model), tokenizer


def analysis_blocks(
    tokenizer: PreTrainedTokenizerBase, spec: DataSpec, num_blocks: int, block_len: int
) -> torch.Tensor:
    """Blocks sampled over every document of the text (as calibration is), or consecutive blocks
    from `--data-offset` when one is given."""
    if spec.offset:
        return token_blocks(tokenizer, spec, num_blocks, block_len)
    return sample_blocks(tokenizer, spec, num_blocks, block_len)


def write_analysis(result: RedundancyReport, folder: Path, title: str, meta: dict) -> None:
    write_json(folder / "analysis.json", {**meta, **result.to_dict()})
    plot_cka(result, folder / "cka.png", title=f"linear CKA: {title}")
    plot_depth_curves(result, folder / "depth.png", title=title)


def summary_table(result: RedundancyReport) -> str:
    rows = []
    for block in range(result.num_layers):
        row = {"block": block, "influence": result.block_influence[block]}
        for span, distances in result.angular_distance.items():
            row[f"ang(l,l+{span})"] = distances[block] if block < len(distances) else ""
        row["CKA(in,out)"] = result.cka[block][block + 1]
        rows.append(row)
    return format_table(rows)
