"""Arguments and output conventions shared by the commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
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


def loop_count(text: str) -> int:
    """An argparse type: recursion steps R in 1..MAX_LOOPS (memory and time grow with R, so 100000
    is refused before the model is loaded, not by the kernel's OOM killer)."""
    from depthkit.recursive.config import MAX_LOOPS

    return _bounded_int(text, 1, MAX_LOOPS)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535 (refused before the model is loaded, not at bind time)."""
    return _bounded_int(text, 1, 65535)


def _bounded_int(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """An argparse type: any finite number (`nan` or `inf` would silently poison every result)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def float_at_least(low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= `low` (> `low` if `strict`), so that a learning rate of
    `inf` or a penalty of `nan` is refused up front instead of failing (or diverging) mid-training."""
    sign = ">" if strict else ">="

    def convert(text: str) -> float:
        value = _number(text)
        if not (math.isfinite(value) and (value > low or (value == low and not strict))):
            raise argparse.ArgumentTypeError(f"must be a finite number {sign} {low:g}, got {text}")
        return value

    return convert


# Thresholds: `nan` or `-1` would silently mean never or always.
non_negative_float = float_at_least(0.0)
# Learning rates, temperatures, scales: 0 would train nothing, `inf` diverge at once.
positive_float = float_at_least(0.0, strict=True)


def number_in(low: float, high: float, closed: bool) -> Callable[[str], float]:
    """An argparse type: a number in [low, high] (`closed`) or (low, high), checked before the model loads."""
    interval = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"

    def convert(text: str) -> float:
        value = _number(text)
        if not (low <= value <= high if closed else low < value < high):  # false for nan too
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return convert


# The fraction of blocks removed (`--ratio`): 0 and 1 would remove nothing or everything.
fraction = number_in(0, 1, closed=False)


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


def add_schedule_args(parser: argparse.ArgumentParser, defaults: Any, unit: str = "sequences", lr_of: str = "",
                      per_stage: str = "") -> None:
    """`--batch-size`, `--lr` and `--warmup-steps`, the same for every training command; `defaults`
    is the command's settings (a `depthkit.training.TrainingSettings`), `unit` what a batch holds,
    `lr_of` what the learning rate applies to, `per_stage` a note for commands that train in stages."""
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help=f"{unit} per optimizer step and process")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help=f"peak learning rate{lr_of}{per_stage} (warm-up, cosine decay)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=defaults.warmup_steps,
                        help=f"linear learning-rate warm-up steps{per_stage}")


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
# The early-exit default a looped model's folder is saved with (`recursive train --save-exit-threshold`) is
# also only written, so a run can be resumed with another one (and older runs' checkpoints lack it).
_RUN_CONTROL = {"func", "out", "overwrite", "json", "device", "resume", "checkpoint_every", "keep_checkpoints",
                "save_exit_threshold", "exit_rule"}


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define a training run: saved with its checkpoints, compared on resume."""
    return {key: value for key, value in vars(args).items()
            if key not in _RUN_CONTROL and not key.endswith("command")}


def add_exit_rule_arg(parser: argparse.ArgumentParser, lead: str = "", from_folder: bool = False) -> None:
    """`--exit-rule`, shared by `recursive train|eval|generate` and `serve`; `lead` opens its help,
    `from_folder`: the default is the rule saved in the loaded folder (`resolve_exit`), else kl."""
    from depthkit.recursive.generate import DEFAULT_EXIT_RULE, EXIT_RULES

    parser.add_argument("--exit-rule", choices=EXIT_RULES, default=None if from_folder else DEFAULT_EXIT_RULE,
                        help=lead + "early exit's distance between consecutive steps: kl (Huginn: the steps' "
                             "next-token distributions; the LM head at every step) or hidden (relative change of "
                             "the block's output; the head only when the token exits)" +
                             (f" (default: the rule saved in the folder's config.json, else {DEFAULT_EXIT_RULE})"
                              if from_folder else ""))


EXIT_OFF = "off"


def exit_threshold_or_off(text: str) -> float | str:
    """An argparse type: an early-exit threshold (a finite number >= 0), or `off`: no early exit, even
    where the loaded folder saves a default (`recursive train --save-exit-threshold`)."""
    return EXIT_OFF if text.strip().lower() == EXIT_OFF else non_negative_float(text)


def resolve_exit(folder: str, threshold: float | str | None, rule: str | None) -> tuple[float | None, str, bool]:
    """The early exit a command runs a loaded folder with: (threshold or None, rule, whether the threshold
    is the folder's saved default). The flags where given (`off`: none), else what the folder's
    `config.json` saves (as plain `transformers` loading it does), else none with the kl rule."""
    from depthkit.recursive.export import saved_exit
    from depthkit.recursive.generate import DEFAULT_EXIT_RULE

    saved_threshold, saved_rule = saved_exit(folder)
    rule = rule or saved_rule or DEFAULT_EXIT_RULE
    if threshold is None:
        return saved_threshold, rule, saved_threshold is not None
    return (None if threshold == EXIT_OFF else float(threshold)), rule, False
