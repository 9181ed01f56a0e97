"""`depthkit fetch`: download and convert the offline models and corpora into the cache."""

from __future__ import annotations

import argparse

from depthkit.data.corpora import FETCHERS, corpus_dir, is_fetched
from depthkit.models.loading import DEFAULT_MODEL, GEMMA3, GEMMA_NOTICE, GEMMA_TERMS, offline_model_dir

MODELS = {"model": DEFAULT_MODEL, "gemma3": GEMMA3}
TARGETS = ("all", *MODELS, *FETCHERS)

HELP = "fetch the offline models and corpora into the cache"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch", help=HELP,
        description=f"Fetch into the cache: `model` ({DEFAULT_MODEL}), `gemma3` ({GEMMA3}, under Google's Gemma "
                    "terms), a corpus, or `all` of them.")
    parser.add_argument("what", nargs="?", default="all", choices=TARGETS, help="what to fetch")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    for target, name in MODELS.items():
        if args.what in ("all", target):
            folder = offline_model_dir(name, force=args.force)
            print(f"{target}: {folder}")
            if name == GEMMA3:
                print(GEMMA_NOTICE.format(terms=folder / GEMMA_TERMS))
    for name, fetcher in FETCHERS.items():
        if args.what in ("all", name):
            if args.force or not is_fetched(name):
                fetcher()
            print(f"{name}: {corpus_dir(name)}")
