"""Arguments and output conventions shared by the commands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from depthkit.data.blocks import SPLITS, DataSpec
from depthkit.models.loading import DEFAULT_MODEL
from depthkit.utils.io import format_table, write_json

DEVICE_HELP = "cpu, cuda, cuda:1, mps, ..."
DTYPE_HELP = "auto (bfloat16 where the device multiplies it natively, else float32), bfloat16 or float32"


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a batch of 0, a window of -5 are refused up front)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (0 usually meaning none or all, as the option says)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (thresholds: `nan` or `-1` would silently mean never or always)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def device_name(text: str) -> str:
    """An argparse type: a torch device this machine has (`cuda` without CUDA is refused up front)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:1, mps, ...") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"there is no {text} (this machine has {torch.cuda.device_count()} GPUs)")
    return text


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    parser.add_argument(
        flag, default=DEFAULT_MODEL,
        help="hub id, local folder, tiny:<model_type>, or the offline default",
    )
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)


def add_data_args(parser: argparse.ArgumentParser, flag: str = "--data", split: str = "heldout",
                  default: str = "austen:prideprejudice") -> None:
    """`--data CORPUS` with `--<name>-split` and `--<name>-offset` to choose the slice."""
    name = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, default=default, dest=name,
                        help="corpus: austen[:book], shakespeare[:play], pydoc[:part], pycode[:module], wikitext2, "
                             "a .txt file/folder, or a mixture joined by + (mix: every offline corpus)")
    parser.add_argument(f"{flag}-split", default=split, choices=SPLITS, dest=f"{name}_split",
                        help="non-overlapping part of each document")
    parser.add_argument(f"{flag}-offset", type=non_negative_int, default=0, dest=f"{name}_offset",
                        help="skip this many tokens first")


def data_spec(args: argparse.Namespace, flag: str = "--data") -> DataSpec:
    name = flag.lstrip("-").replace("-", "_")
    return DataSpec(getattr(args, name), getattr(args, f"{name}_split"), getattr(args, f"{name}_offset"))


def report(result: dict[str, Any], rows: list[dict[str, Any]], json_path: str | Path | None) -> None:
    """Print `rows` as a table and write `result` as JSON when a path is given."""
    print(format_table(rows))
    if json_path:
        print(f"wrote {write_json(json_path, result)}")


def add_checkpoint_args(parser: argparse.ArgumentParser, defaults: Any, folder: str) -> None:
    """`--checkpoint-every`, `--keep-checkpoints` and `--resume`, the same for every training command;
    `defaults` is the command's settings (a `depthkit.training.TrainingSettings`), `folder` its checkpoints'."""
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=defaults.checkpoint_every, metavar="N",
                        help=f"save a resumable checkpoint in {folder} every N optimizer steps and at the last "
                             "(0: never)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=defaults.keep_checkpoints, metavar="N",
                        help=f"keep the N newest checkpoints (older ones are deleted; {folder} is removed once "
                             "the output is written)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue an interrupted run from its latest checkpoint in {folder} (same settings; "
                             "without it, a new run refuses to start where another run's checkpoints are)")


# Arguments that say where a run writes, on which device or how it checkpoints: not what it computes.
_RUN_CONTROL = {"func", "out", "overwrite", "json", "device", "resume", "checkpoint_every", "keep_checkpoints"}


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define a training run: saved with its checkpoints, compared on resume."""
    return {key: value for key, value in vars(args).items()
            if key not in _RUN_CONTROL and not key.endswith("command")}


def add_exit_rule_arg(parser: argparse.ArgumentParser) -> None:
    """`--exit-rule`, shared by `recursive eval|generate` and `serve`."""
    from depthkit.recursive.generate import DEFAULT_EXIT_RULE, EXIT_RULES

    parser.add_argument("--exit-rule", choices=EXIT_RULES, default=DEFAULT_EXIT_RULE,
                        help="early exit's distance between consecutive steps: kl (Huginn: the steps' next-token "
                             "distributions; the LM head at every step) or hidden (relative change of the block's "
                             "output; the head only when the token exits)")
