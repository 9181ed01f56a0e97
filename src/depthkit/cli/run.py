"""`depthkit run`: the quick-start job on the offline default model and text.

Analyses where the default model's depth is redundant and measures its held-out perplexity, so a
new user sees, in one command, what depthkit measures and where its results go.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from depthkit.analysis.redundancy import analyze_redundancy
from depthkit.cli.analyze import summary_table, write_analysis
from depthkit.cli.common import add_model_args
from depthkit.data.blocks import DataSpec, token_blocks, token_stream
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import load_model
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json

CALIB = DataSpec("austen:emma", "calib")
HELDOUT = DataSpec("austen:persuasion", "heldout")


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="the quick-start job: redundancy analysis + perplexity")
    add_model_args(parser)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_output_dir(args.out, overwrite=True)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    analysis = analyze_redundancy(model, token_blocks(tokenizer, CALIB, 16, 256).to(args.device))
    heldout = token_stream(tokenizer, HELDOUT)
    ppl = perplexity(model, heldout, window=512, max_tokens=20 * 512, batch_size=4)
    with atomic_output_dir(args.out, overwrite=True) as tmp:
        write_analysis(analysis, tmp, title=f"{args.model} on {CALIB.describe()}",
                       meta={"model": args.model, "data": CALIB.describe(), "dtype": args.dtype})
        write_json(tmp / "perplexity.json", {"model": args.model, "data": HELDOUT.describe(), **ppl.to_dict()})
    print(summary_table(analysis))
    print(format_table([{"model": args.model, "held-out data": HELDOUT.describe(),
                         "tokens": ppl.tokens_scored, "perplexity": ppl.perplexity}]))
    print(f"results in {Path(args.out)}/: analysis.json, cka.png, depth.png, perplexity.json")
