"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on a model object.

The model is handed to lm_eval as is (`HFLM(pretrained=model, ...)`), so a compressed or looped
model is evaluated in memory, without a save/reload round trip. Tasks are looked up by a
`TaskManager` that includes depthkit's own offline tasks (`depthkit.evaluate.tasks`); the standard
tasks (piqa, hellaswag, ...) load by name where the hub is reachable. Scoring is lm_eval's (acc,
acc_norm); depthkit only picks each task's headline metric and reports chance level.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from depthkit.errors import DepthkitError
from depthkit.evaluate.tasks import DEPTHKIT_TASKS, build_tasks

# The offline tasks are sentences cut from running text, so they are built from the prose domains
# (the manual's paragraphs count); source code has no sentences to cloze.
ZEROSHOT_DOMAINS = ("austen", "shakespeare", "pydoc")
DOMAIN_ITEMS = 200  # items per task and domain in the benchmarks: about +-2.5 points of sampling error each
STANDARD_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
# The field's convention (e.g. ShortGPT, SliceGPT tables): length-normalised accuracy where choices
# are free text of varying length, plain accuracy elsewhere.
_NORMALISED = {"hellaswag", "piqa", "arc_challenge", "openbookqa", "depthkit_continuation"}


def headline_metric(task: str) -> str:
    return "acc_norm" if task in _NORMALISED else "acc"


@dataclass
class TaskScore:
    """One task's lm_eval metrics, its headline accuracy and the chance level of its questions."""

    task: str
    metric: str
    accuracy: float
    metrics: dict[str, float]  # acc, acc_stderr, acc_norm, acc_norm_stderr (as lm_eval reports them)
    items: int
    chance: float
    correct: list[float] = field(default_factory=list)  # the headline metric per item, in item order (0 or 1)


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskScore]
    seconds: float
    limit: int | None
    task_data: dict = field(default_factory=dict)  # manifest of depthkit's task build, if used

    @property
    def average(self) -> float:
        return sum(s.accuracy for s in self.tasks.values()) / len(self.tasks)

    def to_dict(self) -> dict:
        return {**asdict(self), "average": self.average}

    def rows(self) -> list[dict]:
        rows = [{"task": s.task, "metric": s.metric, "accuracy": s.accuracy,
                 "stderr": s.metrics.get(f"{s.metric}_stderr", float("nan")), "chance": s.chance, "items": s.items}
                for s in self.tasks.values()]
        return [*rows, {"task": "average", "metric": "", "accuracy": self.average, "stderr": "",
                        "chance": sum(s.chance for s in self.tasks.values()) / len(self.tasks), "items": ""}]


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DepthkitError("no tasks given; try " + ",".join(DEPTHKIT_TASKS))
    return names


def task_manager(names: list[str], corpus: str = "austen", seed: int = 0, size: int = 500):
    """A TaskManager that knows `names`: depthkit's tasks (built if needed) and, if asked, lm_eval's."""
    from lm_eval.tasks import TaskManager

    ours = [n for n in names if n in DEPTHKIT_TASKS]
    folder = build_tasks(corpus, seed, size) if ours else None
    manager = TaskManager(include_path=str(folder.path) if folder else None,
                          include_defaults=len(ours) < len(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DepthkitError(
            f"unknown task(s) {', '.join(unknown)}; depthkit's offline tasks: {', '.join(DEPTHKIT_TASKS)}; "
            f"standard tasks (need the hub): {', '.join(STANDARD_TASKS)}; or any lm_eval task name"
        )
    groups = [n for n in names if n not in manager.all_subtasks]
    if groups:
        raise DepthkitError(f"{', '.join(groups)}: a group or tag of lm_eval tasks; list its tasks instead")
    return manager, folder


def _load_task_data(manager, names: list[str]) -> None:
    """Load every task's data once up front, so a missing dataset is one clear error before any scoring.

    Without a network `datasets` retries for half a minute per standard task before it fails, so the
    hub is probed once first (in explicit offline mode, `HF_HUB_OFFLINE=1`, its cache is read at once).
    """
    from huggingface_hub import constants

    from depthkit.utils.fetch import hub_reachable

    standard = [name for name in names if name not in DEPTHKIT_TASKS]
    if standard and not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise DepthkitError(
            f"task(s) {', '.join(standard)} load their data from the Hugging Face hub, which is not reachable here; "
            f"use depthkit's offline tasks ({', '.join(DEPTHKIT_TASKS)}) or set HF_HUB_OFFLINE=1 to read a local "
            "datasets cache")
    try:
        manager.load(names)
    except Exception as err:  # noqa: BLE001 - datasets/hub failures come in many types, all mean "no data"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DepthkitError(
            f"could not load the data of task(s) {', '.join(names)}: {first}. The standard tasks need the "
            f"Hugging Face hub; offline, use {', '.join(DEPTHKIT_TASKS)}"
        ) from err


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | list[str] = DEPTHKIT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    corpus: str = "austen",
    seed: int = 0,
    size: int = 500,
) -> ZeroShotResult:
    """Zero-shot accuracy of `model` on `tasks` (first `limit` items of each, if given) via lm_eval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise DepthkitError(f"`limit` must be a positive number of items, got {limit}")
    manager, folder = task_manager(names, corpus, seed, size)
    _quiet_lm_eval()
    _load_task_data(manager, names)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
    began = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=0, log_samples=True,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    seconds = time.perf_counter() - began
    scores = {name: _task_score(name, output["results"][name], output["samples"][name]) for name in names}
    return ZeroShotResult(scores, seconds, limit, folder.manifest if folder else {})


def zero_shot_by_domain(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limit: int | None,
    domains: tuple[str, ...] = ZEROSHOT_DOMAINS,
) -> dict[str, ZeroShotResult]:
    """depthkit's offline tasks built from each domain's heldout split: one domain's tasks would
    judge a model calibrated or trained on that domain on its home ground."""
    return {domain: zero_shot(model, tokenizer, limit=limit, corpus=domain) for domain in domains}


def zero_shot_record(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limit: int,
) -> dict[str, dict[str, Any]]:
    """What a benchmark stores of a model's zero-shot run (`limit` items per task and domain; 0:
    none, both parts empty): `zeroshot`, the average accuracy per domain (what `retention`
    compares), and `zeroshot_items`, each item's score per domain and task (what
    `retention_interval` resamples)."""
    results = zero_shot_by_domain(model, tokenizer, limit) if limit else {}
    return {"zeroshot": {domain: result.average for domain, result in results.items()},
            "zeroshot_items": {domain: {task: score.correct for task, score in result.tasks.items()}
                               for domain, result in results.items()}}


def retention(scores: dict[str, float], base: dict[str, float]) -> float:
    """Accuracy kept relative to the original, averaged over domains (each domain weighs the same)."""
    return sum(scores[d] / base[d] for d in scores) / len(scores)


def retention_interval(
    items: dict[str, dict[str, list[float]]], base_items: dict[str, dict[str, list[float]]],
    level: float = 0.95, iterations: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap interval of `retention`: the items of every task are resampled with the
    same draw for the model and the original, so the interval reflects how the two differ on the
    same questions, not each one's sampling error (which is larger: about +-2.5 points per domain
    at 200 items, and mostly shared)."""
    rng = np.random.default_rng(seed)
    kept = np.zeros(iterations)
    for domain, tasks in items.items():
        mine, base = np.zeros(iterations), np.zeros(iterations)
        for task, correct in tasks.items():
            ours, theirs = np.asarray(correct, dtype=float), np.asarray(base_items[domain][task], dtype=float)
            if ours.shape != theirs.shape or not len(ours):
                raise DepthkitError(f"{domain} {task}: the model and the original were scored on different items")
            draw = rng.integers(0, len(ours), size=(iterations, len(ours)))
            mine += ours[draw].mean(1) / len(tasks)
            base += theirs[draw].mean(1) / len(tasks)
        kept += mine / base / len(items)
    low, high = np.quantile(kept, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _task_score(task: str, results: dict, samples: list[dict]) -> TaskScore:
    """Strip lm_eval's ',none' filter suffixes; chance = mean of 1 / number of choices over the items."""
    metrics = {key.split(",")[0]: float(value) for key, value in results.items()
               if key.startswith("acc") and isinstance(value, (int, float))}
    metric = headline_metric(task) if headline_metric(task) in metrics else "acc"
    if metric not in metrics:
        raise DepthkitError(f"task {task} reports no accuracy (is it a multiple-choice task?)")
    chance = sum(1 / len(s["arguments"]) for s in samples) / len(samples)
    correct = [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    return TaskScore(task, metric, metrics[metric], metrics, len(samples), chance, correct)


def _quiet_lm_eval() -> None:
    """lm_eval logs every task config at INFO; keep warnings, drop the chatter."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
