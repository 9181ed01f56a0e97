"""The `depthkit` command. Each module of this package that defines `register(subparsers)` adds
one top-level command, so a new command is a new file here."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from depthkit.errors import DepthkitError

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DepthkitError as err:
        print(f"depthkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
