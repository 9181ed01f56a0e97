"""The evaluation suite end to end: the default model and a 24-layer version of it, side by side.

    .venv/bin/python benchmarks/eval_suite.py            # builds the 24-layer model itself (ShortGPT)
    .venv/bin/python benchmarks/eval_suite.py --method flatten   # ... with another registered method
    .venv/bin/python benchmarks/eval_suite.py --models runs/flatten-24   # or compare given checkpoints
    .venv/bin/python benchmarks/eval_suite.py --quick    # 50 items per task etc., for a busy shared CPU

Without --models, the 24-layer model is the default model compressed by `--remove` (6) blocks with
the library's `--method` (default shortgpt: the blocks of lowest block influence; `--option
KEY=VALUE` as in `depthkit compress`), calibrated on 8 x 256 tokens of Austen's calib split, saved
with its compression card to a temporary folder. Both models then get the full offline zero-shot tasks (500 items each,
through lm_eval), perplexity on held-out Pride and Prejudice and the speed benchmark, and
`depthkit report` writes benchmarks/results/eval_suite/ (report.md, report.json, PNG charts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from depthkit.cli.compress import parse_options
from depthkit.cli.main import main as depthkit
from depthkit.compress import compress, save_compressed
from depthkit.data import DataSpec, token_blocks
from depthkit.models.loading import DEFAULT_MODEL, load_model

OUT = Path(__file__).parent / "results" / "eval_suite"


def compressed_copy(model_name: str, method: str, options: list[str], remove: int, folder: Path) -> str:
    """Save `model_name` compressed by `remove` blocks with the library's `method` into `folder`
    (a new folder, with its compression card); return what was done, for the log."""
    model, tokenizer = load_model(model_name, dtype="float32")
    calib = token_blocks(tokenizer, DataSpec("austen", "calib"), 8, 256)
    report = compress(model, method, target_layers=model.config.num_hidden_layers - remove, calib_ids=calib,
                      **parse_options(options))
    save_compressed(model, tokenizer, folder, report)
    removed = report.details.get("removed_blocks")
    return f"removed blocks {removed}" if removed is not None else f"{method}: {report.num_layers_after} blocks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models", nargs="*", default=None, help="compressed checkpoints (default: build one)")
    parser.add_argument("--method", default="shortgpt", help="registered compression method of the built model")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --method (repeatable), as in `depthkit compress`")
    parser.add_argument("--remove", type=int, default=6, help="blocks removed from the built comparison model")
    parser.add_argument("--out", default=None, help=f"report folder (default {OUT}[_quick])")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all 500)")
    parser.add_argument("--max-tokens", type=int, default=20480, help="perplexity tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per speed measurement")
    parser.add_argument("--quick", action="store_true",
                        help="for a busy shared CPU: 50 items per task, 4096 perplexity tokens, 2 speed repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.max_tokens, args.repeats = args.limit or 50, 4096, 2
    args.out = args.out or f"{OUT}{'_quick' if args.quick else ''}"

    with tempfile.TemporaryDirectory(prefix="eval_suite-") as tmp:
        models, labels = args.models, None
        if not models:
            built = Path(tmp) / "model"
            print(compressed_copy(args.model, args.method, args.option, args.remove, built))
            models = [str(built)]
            labels = f"{Path(args.model).name},{args.method}-minus{args.remove}-blocks"
        command = ["report", "--base", args.model, "--models", *models, "--out", args.out, "--overwrite",
                   "--max-tokens", str(args.max_tokens), "--window", "1024", "--repeats", str(args.repeats)]
        command += ["--labels", labels] if labels else []
        command += ["--limit", str(args.limit)] if args.limit else []
        code = depthkit(command)
    if code == 0:
        report = json.loads((Path(args.out) / "report.json").read_text())
        print(json.dumps([{k: s[k] for k in ("label", "layers", "perplexity", "accuracy", "average_accuracy",
                                               "retained", "prefill_speedup", "decode_speedup")}
                          for s in report["summaries"]], indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
