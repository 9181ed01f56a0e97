"""`depthkit compress`: remove or merge blocks with a registered method and save a plain checkpoint.

    depthkit compress --method flatten --ratio 0.2 --out runs/flat24            # calibration: every offline domain
    depthkit compress --method shortgpt --target-layers 24 --out runs/short24 --eval-data austen:persuasion
    depthkit compress --method flatten --ratio 0.2 --offload disk --out runs/flat24   # model larger than memory
    depthkit compress --method sleb --ratio 0.3 --save-plan runs/sleb.json --out runs/sleb21   # search once...
    depthkit compress --plan runs/sleb.json --ratio 0.2 --out runs/sleb24          # ...apply the plan again at 20%
    depthkit compress --list

`--offload disk` never loads the whole model: blocks are read one at a time from the checkpoint's
safetensors files and the compressed blocks are written as they are produced (methods that can:
see the error message of the others). Every run prints its peak resident memory.

`--save-plan` writes what the method's search chose (`depthkit.compress.plan`); `--plan` applies
such a file (or a compression card's plan) without searching, with its method and options, and
refuses before loading any weight a plan of another method, model depth or search option, or one
that cannot give the requested depth exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthkit.cli.common import add_data_args, add_model_args, data_spec, fraction, positive_int
from depthkit.compress.api import (
    CARD_JSON,
    DEFAULT_CALIB,
    DEFAULT_CALIB_BLOCKS,
    DEFAULT_CALIB_LEN,
    DEFAULT_METHOD,
    CompressionJob,
    CompressionReport,
    compress,
    compress_checkpoint,
    list_methods,
    save_compressed,
)
from depthkit.data.blocks import sequence_prefix, token_stream
from depthkit.data.corpora import load_documents
from depthkit.errors import require
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import load_model, model_config
from depthkit.models.streaming import peak_memory_mb
from depthkit.utils.io import check_output_dir, format_table, write_json

HELP = "depth compression: FlattenGPT and block-pruning baselines"


def register(subparsers) -> None:
    parser = subparsers.add_parser("compress", help=HELP)
    parser.add_argument("--list", action="store_true", help="list the registered methods and exit")
    add_model_args(parser)
    parser.add_argument("--method", default=None,
                        help=f"a registered method (see --list); default {DEFAULT_METHOD}, or the --plan's")
    parser.add_argument("--ratio", type=fraction, default=None, help="fraction of blocks to remove, in (0, 1)")
    parser.add_argument("--target-layers", type=positive_int, default=None, help="blocks to keep (instead of --ratio)")
    add_data_args(parser, "--calib", split="calib", default=DEFAULT_CALIB)
    parser.add_argument("--num-calib-blocks", type=positive_int, default=DEFAULT_CALIB_BLOCKS,
                        help="calibration sequences, sampled over the whole calibration text")
    parser.add_argument("--calib-block-len", type=positive_int, default=DEFAULT_CALIB_LEN,
                        help="tokens per calibration sequence")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option (repeatable); values are read as int, float, bool or text")
    parser.add_argument("--plan", default=None, metavar="FILE",
                        help="apply this saved plan (--save-plan's file, or a compression card) instead of searching; "
                             "its method and options apply unless given")
    parser.add_argument("--save-plan", default=None, metavar="FILE",
                        help="write the plan the search chose here (JSON), also without --out")
    parser.add_argument("--out", default=None, help="save the compressed checkpoint here (a new folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder depthkit wrote")
    parser.add_argument("--offload", choices=("none", "disk"), default="none",
                        help="disk: stream blocks from the checkpoint on disk (needs --out; memory ~ one block)")
    add_data_args(parser, "--eval-data", split="heldout", default=None)
    parser.add_argument("--eval-window", type=positive_int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--eval-max-tokens", type=positive_int, default=20 * 512, help="tokens scored for perplexity")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.set_defaults(func=run)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict, values converted to int, float or bool when they read as one."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        require(bool(sep) and bool(key), f"--option expects KEY=VALUE, got '{pair}'")
        options[key.strip().replace("-", "_")] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def run(args: argparse.Namespace) -> None:
    if args.list:
        print(format_table(list_methods()))
        return
    options = parse_options(args.option)
    # an unknown method or option, a bad plan, an unwritable --save-plan: fail before loading anything
    job = CompressionJob(args.method, options, args.plan, args.save_plan)
    if args.out:
        require(job.runner.produces_checkpoint,
                f"method '{job.runner.name}' does not produce a standard checkpoint; run it without --out")
        check_output_dir(args.out, args.overwrite)
    load_documents(args.calib)  # an unknown corpus, an empty or non-UTF-8 file: fail before loading the model
    # depth-dependent checks (the plan's depth and count among them), before any weight loads
    job.for_depth(model_config(args.model).num_hidden_layers, args.ratio, args.target_layers)
    if args.offload == "disk":
        run_streaming(args, options)
        return
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    held_out = token_stream(tokenizer, data_spec(args, "--eval-data")) if args.eval_data else None
    row: dict[str, Any] = {}
    if held_out is not None:
        row["ppl before"] = _perplexity(model, held_out, sequence_prefix(tokenizer), args)
    report = compress(model, args.method, ratio=args.ratio, target_layers=args.target_layers, tokenizer=tokenizer,
                      calib=data_spec(args, "--calib"), num_calib_blocks=args.num_calib_blocks,
                      calib_block_len=args.calib_block_len, plan=args.plan, save_plan=args.save_plan, **options)
    report.model = args.model
    if held_out is not None:
        row["ppl after"] = _perplexity(model, held_out, sequence_prefix(tokenizer), args)
        report.details["held_out_perplexity"] = {"data": data_spec(args, "--eval-data").describe(),
                                                 "before": row["ppl before"], "after": row["ppl after"]}
    if args.out:
        save_compressed(model, tokenizer, args.out, report, overwrite=args.overwrite)
    _print_report(report, row, args)


def run_streaming(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """`--offload disk`: checkpoint folder in, checkpoint folder out, one block in memory at a time."""
    require(args.out is not None, "--offload disk writes the compressed model block by block: give --out")
    require(not args.eval_data, "--eval-data needs the whole model in memory; evaluate the saved --out "
                                "folder with `depthkit eval ppl` instead")
    report = compress_checkpoint(args.model, args.out, args.method, ratio=args.ratio, target_layers=args.target_layers,
                                 calib=data_spec(args, "--calib"), num_calib_blocks=args.num_calib_blocks,
                                 calib_block_len=args.calib_block_len, plan=args.plan, save_plan=args.save_plan,
                                 device=args.device, dtype=args.dtype, overwrite=args.overwrite, **options)
    _print_report(report, {}, args)


def _print_report(report: CompressionReport, row: dict[str, Any], args: argparse.Namespace) -> None:
    peak = peak_memory_mb()
    print(format_table([{**report.summary_row(), **row, "peak RSS (MiB)": round(peak.get("vmhwm_mb", 0.0)
                                                                              or peak["ru_maxrss_mb"])}]))
    if args.save_plan:
        print(f"wrote plan {args.save_plan}")
    if args.out:
        print(f"saved {args.out} (card: {Path(args.out) / CARD_JSON})")
    if args.json:
        print(f"wrote {write_json(args.json, report.to_dict() | {'peak_memory_mb': peak})}")


def _perplexity(model, stream, prefix: list[int], args: argparse.Namespace) -> float:
    return perplexity(model, stream, window=args.eval_window, max_tokens=args.eval_max_tokens, batch_size=4,
                      prefix=prefix).perplexity
