"""`depthkit run`: the quick-start job on the offline default model and text.

In one command a new user sees what depthkit is for: where the default model's depth is
redundant (analysis), and FlattenGPT against the simplest block-removal baseline (ShortGPT) at
20% depth reduction, calibrated on the default mixture of every offline domain and judged on the
held-out text of each domain, with the FlattenGPT model saved as a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from depthkit.analysis.redundancy import analyze_redundancy
from depthkit.cli.analyze import summary_table, write_analysis
from depthkit.cli.common import add_model_args, fraction
from depthkit.compress.api import compress, save_compressed
from depthkit.data.blocks import DataSpec, sample_blocks
from depthkit.data.corpora import DEFAULT_CALIB, MIX_COMPONENTS
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import load_model
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json

CALIB = DataSpec(DEFAULT_CALIB, "calib")
HELDOUT_BLOCKS = 8  # x 512 tokens of every domain's heldout split
METHODS = ("shortgpt", "flatten")

HELP = "the quick-start job: analysis, then FlattenGPT vs ShortGPT at 20%%"


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help=HELP)
    add_model_args(parser)
    parser.add_argument("--ratio", type=fraction, default=0.2, help="fraction of blocks removed")
    parser.add_argument("--out", default="runs/quickstart",
                        help="output folder (replaced if depthkit wrote it; any other existing folder is refused)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_output_dir(args.out, overwrite=True)  # a folder depthkit did not write: refused before the work
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    heldout = {domain: sample_blocks(tokenizer, DataSpec(domain, "heldout"), HELDOUT_BLOCKS, 512).flatten()
               for domain in MIX_COMPONENTS}
    analysis = analyze_redundancy(model, sample_blocks(tokenizer, CALIB, 16, 256).to(args.device))
    rows = [_evaluate("original", model, heldout, None)]
    compressed = {}
    for method in METHODS:
        candidate = copy.deepcopy(model)
        card = compress(candidate, method=method, ratio=args.ratio, tokenizer=tokenizer, calib=CALIB)
        rows.append(_evaluate(method, candidate, heldout, card.seconds))
        compressed[method] = (candidate, card)
    with atomic_output_dir(args.out, overwrite=True) as tmp:
        write_analysis(analysis, tmp, title=f"{args.model} on {CALIB.describe()}",
                       meta={"model": args.model, "data": CALIB.describe(), "dtype": args.dtype})
        write_json(tmp / "results.json", {"model": args.model, "calibration": CALIB.describe(),
                                          "heldout": f"{HELDOUT_BLOCKS} x 512 tokens of each domain's heldout split",
                                          "ratio": args.ratio, "rows": rows})
        flat_model, flat_card = compressed["flatten"]
        save_compressed(flat_model, tokenizer, tmp / "flatten", flat_card)
    print(summary_table(analysis))
    print(format_table(rows))
    print(f"results in {Path(args.out)}/: analysis.json, cka.png, depth.png, results.json, "
          "flatten/ (a plain Hugging Face checkpoint)")


def _evaluate(name: str, model, heldout: dict, seconds: float | None) -> dict:
    """Held-out perplexity on every domain (one column each)."""
    layers = model.config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    ppl = {f"{domain} ppl": perplexity(model, stream, window=512, batch_size=4, progress=False).perplexity
           for domain, stream in heldout.items()}
    return {"model": name, "blocks": layers, "params (M)": params / 1e6, **ppl,
            "compress s": seconds if seconds is not None else ""}
