"""Arguments and output conventions shared by the commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthkit.data.blocks import SPLITS, DataSpec
from depthkit.models.loading import DEFAULT_MODEL
from depthkit.utils.io import format_table, write_json

DTYPE_HELP = "auto (default: bfloat16 where the device multiplies it natively, else float32), bfloat16 or float32"


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    parser.add_argument(
        flag, default=DEFAULT_MODEL,
        help=f"hub id, local folder, tiny:<model_type>, or the offline default ({DEFAULT_MODEL})",
    )
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_data_args(parser: argparse.ArgumentParser, flag: str = "--data", split: str = "heldout",
                  default: str = "austen:prideprejudice") -> None:
    """`--data CORPUS` with `--<name>-split` and `--<name>-offset` to choose the slice."""
    name = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, default=default, dest=name,
                        help=f"corpus: austen[:book], shakespeare[:play], pydoc[:part], pycode[:module], wikitext2, "
                             f"a .txt file/folder, or a mixture joined by + (mix: every offline corpus); "
                             f"default {default}")
    parser.add_argument(f"{flag}-split", default=split, choices=SPLITS, dest=f"{name}_split",
                        help=f"non-overlapping part of each document (default {split})")
    parser.add_argument(f"{flag}-offset", type=int, default=0, dest=f"{name}_offset",
                        help="skip this many tokens first")


def data_spec(args: argparse.Namespace, flag: str = "--data") -> DataSpec:
    name = flag.lstrip("-").replace("-", "_")
    return DataSpec(getattr(args, name), getattr(args, f"{name}_split"), getattr(args, f"{name}_offset"))


def report(result: dict[str, Any], rows: list[dict[str, Any]], json_path: str | Path | None) -> None:
    """Print `rows` as a table and write `result` as JSON when a path is given."""
    print(format_table(rows))
    if json_path:
        print(f"wrote {write_json(json_path, result)}")
