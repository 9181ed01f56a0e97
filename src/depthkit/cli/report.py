"""`depthkit report`: a base model and its compressed or looped versions, side by side.

Each of --base/--models is a model (evaluated here: perplexity, zero-shot accuracy, speed) or a
comma-separated list of JSON results written earlier by `depthkit eval ... --json` (or a model
record from an earlier report's `models/` folder), so slow evaluations need not be repeated.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from depthkit.cli.common import DEVICE_HELP, DTYPE_HELP, add_data_args, device_name, positive_int
from depthkit.cli.eval import (
    add_ppl_args,
    add_speed_args,
    add_zeroshot_args,
    evaluate_ppl,
    evaluate_speed,
    evaluate_zeroshot,
    load_for_evaluation,
)
from depthkit.data.corpora import MIX_COMPONENTS
from depthkit.errors import DepthkitError
from depthkit.evaluate.behaviour import BehaviourSuite
from depthkit.evaluate.report import merge_results, read_result, summary_rows, write_report
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json

HELP = "compare models: zero-shot accuracy, perplexity, speed, behaviour"


def evaluate_behaviour(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    """Agreement with the base model, the first one evaluated: its predictions on held-out text of every
    offline domain and its chat answers are kept (`BehaviourSuite`) and every model is compared with them."""
    if args.behaviour_suite is None:
        args.behaviour_suite = BehaviourSuite(model, tokenizer, list(MIX_COMPONENTS), "heldout",
                                              args.behaviour_blocks, args.behaviour_len)
    return {"kind": "behaviour", "model": name, **args.behaviour_suite.measure(model)}


EVALS = {"ppl": evaluate_ppl, "zeroshot": evaluate_zeroshot, "speed": evaluate_speed, "behaviour": evaluate_behaviour}


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help=HELP)
    parser.add_argument("--base", required=True, help="base model, or comma-separated JSON results of it")
    parser.add_argument("--models", nargs="+", default=[], help="models (or JSON results) to compare with the base")
    parser.add_argument("--labels", default=None, help="comma-separated names for the base and models")
    parser.add_argument("--evals", default="ppl,zeroshot,speed,behaviour",
                        help="what to evaluate for models given by name (behaviour: top-1 agreement and KL "
                             "against the base on held-out text of every domain, and its chat answers)")
    parser.add_argument("--behaviour-blocks", type=positive_int, default=8, help="held-out blocks per domain")
    parser.add_argument("--behaviour-len", type=positive_int, default=256, help="tokens per behaviour block")
    parser.add_argument("--out", required=True, help="report folder (report.md, report.json, PNG charts)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder depthkit wrote")
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    add_data_args(parser)
    add_ppl_args(parser)
    add_zeroshot_args(parser)
    add_speed_args(parser)
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    specs = [args.base, *args.models]
    labels = args.labels.split(",") if args.labels else [None] * len(specs)
    if len(labels) != len(specs):
        raise DepthkitError(f"--labels names {len(labels)} models but {len(specs)} are given (base first)")
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    unknown = sorted(set(evals) - set(EVALS))
    if unknown or not evals:
        raise DepthkitError(f"unknown evaluation(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(EVALS)}")
    if "behaviour" in evals and _is_json_results(args.base) and not all(map(_is_json_results, args.models)):
        raise DepthkitError("the behaviour evaluation compares every model with the base's own predictions: give "
                            "--base as a model, or leave behaviour out of --evals")
    args.behaviour_suite = None
    records = [model_record(spec, label, evals, args) for spec, label in zip(specs, labels)]
    if len({r["label"] for r in records}) != len(records):
        raise DepthkitError("two models have the same label; name them with --labels")
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        for i, record in enumerate(records):
            write_json(tmp / "models" / f"{i}-{_safe(record['label'])}.json", record)
        report = write_report(records, tmp)
    print(format_table(summary_rows(report["summaries"])))
    print(f"wrote {Path(args.out) / 'report.md'}")


def model_record(spec: str, label: str | None, evals: list[str], args: argparse.Namespace) -> dict:
    """A model's record: read from JSON results, or evaluated now."""
    if _is_json_results(spec):
        return merge_results([read_result(p.strip()) for p in spec.split(",") if p.strip()], label)
    model, tokenizer = load_for_evaluation(spec, args.dtype, args.device)
    label = label or Path(spec.rstrip("/")).name
    print(f"== {label}: {', '.join(evals)}")
    payloads = [EVALS[e](model, tokenizer, spec, args) for e in evals]
    del model
    gc.collect()
    return merge_results(payloads, label)


def _is_json_results(spec: str) -> bool:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return bool(parts) and all(p.endswith(".json") for p in parts)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
