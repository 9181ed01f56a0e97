"""What the multi-seed benchmarks share: seed lists, reusing a finished run, mean and standard error.

One seed's differences between variants are often the size of that seed's noise, so the benchmarks
that train (recursion.py, recursive_vlm.py) can run once per seed and decide their targets on the
mean paired difference over seeds. A finished seed whose settings match is reused, so seeds can
run as separate jobs before one summary run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

NOT_RESULTS = ("seed", "seeds", "out", "torch_threads")  # where and how a run ran, not what it measured


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got '{text}'")


def comparable_settings(settings: dict) -> dict:
    """The settings that decide a run's results (not where it was written or how many threads ran it)."""
    return {k: v for k, v in settings.items() if k not in NOT_RESULTS}


def reusable_run(path: Path, settings: dict, finished: Callable[[dict], bool]) -> dict | None:
    """The results in `path` when a finished run of the same comparable settings wrote them."""
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if not finished(results) or comparable_settings(results["settings"]) != comparable_settings(settings):
        print(f"{path}: another setting or unfinished; running it again")
        return None
    print(f"{path}: reusing the finished run")
    return results


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over seeds (0 for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))
