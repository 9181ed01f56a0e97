"""The `depthkit` command. Each module of this package that defines `register(subparsers)` adds
one top-level command, so a new command is a new file here."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

from depthkit.errors import DepthkitError
from depthkit.utils.precision import dtype_name, fast_dtype, resolve_mixed_precision

_NOT_COMMANDS = {"main", "common"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthkit", description="Make transformers cheaper by working on their depth."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    import depthkit.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name not in _NOT_COMMANDS:
            importlib.import_module(f"depthkit.cli.{info.name}").register(subparsers)
    return parser


def resolve_auto_precision(args: argparse.Namespace) -> None:
    """Turn `--dtype auto` / `--mixed-precision auto` into what they mean on this run's device, so
    that every command computes in, and records, the dtype it really used."""
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() and not getattr(args, "cpu", False)
                                               else "cpu")
    if getattr(args, "dtype", None) == "auto":
        args.dtype = dtype_name(fast_dtype(device))
    if getattr(args, "mixed_precision", None) == "auto":
        args.mixed_precision = resolve_mixed_precision("auto", device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve_auto_precision(args)
        args.func(args)
    except DepthkitError as err:
        print(f"depthkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthkit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, the traceback on request
        if os.environ.get("DEPTHKIT_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"depthkit: error: {type(err).__name__}: {first} (set DEPTHKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
