"""`depthkit eval ...`: perplexity (and more evaluation subcommands)."""

from __future__ import annotations

import argparse

from depthkit.cli.common import add_data_args, add_model_args, data_spec, report
from depthkit.data.blocks import token_stream
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model")
    evals = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = evals.add_parser("ppl", help="perplexity over fixed or sliding windows")
    add_model_args(ppl)
    add_data_args(ppl)
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument("--stride", type=int, default=None, help="< window for sliding windows (default: window)")
    ppl.add_argument("--max-tokens", type=int, default=51200, help="evaluate the first N tokens (0: all)")
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--json", default=None, help="write the result here")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    spec = data_spec(args)
    result = perplexity(model, token_stream(tokenizer, spec), window=args.window, stride=args.stride,
                        batch_size=args.batch_size, max_tokens=args.max_tokens or None)
    payload = {"model": args.model, "dtype": args.dtype, "data": spec.describe(), **result.to_dict()}
    row = {"model": args.model, "data": spec.describe(), "window": result.window, "stride": result.stride,
           "tokens": result.tokens_scored, "perplexity": result.perplexity, "seconds": result.seconds}
    report(payload, [row], args.json)
