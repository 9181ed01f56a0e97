"""`depthkit fetch`: download and convert the offline default model and corpora into the cache."""

from __future__ import annotations

import argparse

from depthkit.data.corpora import FETCHERS, corpus_dir, is_fetched
from depthkit.models.loading import default_model_dir

TARGETS = ("all", "model", *FETCHERS)


def register(subparsers) -> None:
    parser = subparsers.add_parser("fetch", help="fetch the offline model and corpora into the cache")
    parser.add_argument("what", nargs="?", default="all", choices=TARGETS)
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.what in ("all", "model"):
        print(f"model: {default_model_dir()}")
    for name, fetcher in FETCHERS.items():
        if args.what in ("all", name):
            if args.force or not is_fetched(name):
                fetcher()
            print(f"{name}: {corpus_dir(name)}")
