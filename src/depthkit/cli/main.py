"""The `depthkit` command. Each module of this package that defines `register(subparsers)` and a
one-line `HELP` adds one top-level command, so a new command is a new file here.

Only the command being run is imported: the others are listed from their `HELP`, read from the
source without importing it, so `depthkit --help` or a mistyped command needs neither torch nor
transformers (a few seconds each to import)."""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import re
import signal
import sys
import threading
from pathlib import Path

from depthkit.errors import DepthkitError
from depthkit.utils.io import check_output_file

_NOT_COMMANDS = {"main", "common"}


def command_help() -> dict[str, str]:
    """Every command's name and one-line help (its module's `HELP`), read without importing it."""
    import depthkit.cli as package

    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _NOT_COMMANDS:
            continue
        tree = ast.parse((Path(package.__path__[0]) / f"{info.name}.py").read_text())
        found[info.name] = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                                and any(getattr(t, "id", None) == "HELP" for t in node.targets))
    return found


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, so no help text has to repeat it (and none can
    get it wrong). Not for flags (off unless given) nor for a default of None, whose meaning the
    option's help says ("default: the saved one")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if not shown or default in (None, argparse.SUPPRESS, []) or isinstance(default, bool):
            return text
        value = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {value.replace('%', '%%')})".lstrip()


class DepthkitParser(argparse.ArgumentParser):
    """The parser of the command and of every subcommand (`add_subparsers` creates its own class),
    so `DefaultsHelpFormatter` is set here once for all of them."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it names is imported and fully registered."""
    parser = DepthkitParser(prog="depthkit", description="Make transformers cheaper by working on their depth.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = command_help()
    chosen = next((arg for arg in argv if arg in commands), None) if argv is not None else None
    for name, help_text in commands.items():
        if argv is None or name == chosen:
            importlib.import_module(f"depthkit.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def resolve_auto_precision(args: argparse.Namespace) -> None:
    """Turn `--dtype auto` / `--mixed-precision auto` into what they mean on this run's device, so
    that every command computes in, and records, the dtype it really used."""
    import torch

    from depthkit.utils.precision import dtype_name, fast_dtype, resolve_mixed_precision

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() and not getattr(args, "cpu", False)
                                               else "cpu")
    if getattr(args, "dtype", None) == "auto":
        args.dtype = dtype_name(fast_dtype(device))
    if getattr(args, "mixed_precision", None) == "auto":
        args.mixed_precision = resolve_mixed_precision("auto", device)


def as_flags(message: str, args: argparse.Namespace) -> str:
    """The library names options as `name`; on the command line they are `--name` (when this command has one)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`",
                  lambda m: "--" + m[1].replace("_", "-") if hasattr(args, m[1]) else m[0], message)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (what `timeout`, Docker and schedulers send) unwinds like Ctrl-C, so every temporary
    output folder is removed on the way out instead of being left behind."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if getattr(args, "json", None):
            check_output_file(args.json)  # every command's --json, before the work whose result it holds
        resolve_auto_precision(args)
        args.func(args)
    except DepthkitError as err:
        print(f"depthkit: error: {as_flags(str(err), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthkit: interrupted; nothing was left half-written", file=sys.stderr)
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
