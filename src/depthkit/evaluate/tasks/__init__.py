"""depthkit's own offline zero-shot tasks, as lm-evaluation-harness task folders.

Without the hub, lm_eval's standard tasks cannot load their data. depthkit builds two
multiple-choice tasks from held-out public-domain text instead (see `items.py` for how items
are made fair). The task definitions are YAML templates shipped in this package; `build_tasks`
writes the items as JSONL and concrete YAMLs pointing at them into a cache folder keyed by
(corpus, seed, size), which `TaskManager(include_path=...)` then loads like any lm_eval task, so
the scoring (acc, acc_norm) is lm_eval's own.

Only the `heldout` split of the corpus is used: the text that compression methods calibrate on
(`calib`) never appears in an evaluation item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from depthkit.data import split_documents
from depthkit.errors import DepthkitError
from depthkit.evaluate.tasks.items import BUILDERS, NUM_CHOICES, build_items, label_balance
from depthkit.evaluate.tasks.text import book_sentences
from depthkit.paths import cache_subdir
from depthkit.utils.io import atomic_output_dir, write_json

DEPTHKIT_TASKS = tuple(BUILDERS)  # depthkit_cloze, depthkit_continuation
TEMPLATES = {"depthkit_cloze": "cloze.yaml", "depthkit_continuation": "continuation.yaml"}
BUILD_VERSION = 1  # bump when item construction changes, so cached task folders are rebuilt
MIN_ITEMS = 100


@dataclass(frozen=True)
class TaskFolder:
    """A built task folder: what lm_eval's TaskManager includes, and the build's manifest."""

    path: Path
    manifest: dict

    def data_file(self, task: str) -> Path:
        return self.path / f"{task}.jsonl"


def build_tasks(corpus: str = "austen", seed: int = 0, size: int = 500, rebuild: bool = False) -> TaskFolder:
    """Build (or reuse from the cache) both depthkit tasks: `size` items each from `corpus`'s heldout split."""
    if size < MIN_ITEMS:
        raise DepthkitError(f"a task needs at least {MIN_ITEMS} items to say anything, got size={size}")
    key = "".join(c if c.isalnum() else "-" for c in corpus)
    folder = cache_subdir("tasks") / f"v{BUILD_VERSION}-{key}-seed{seed}-n{size}"
    if (folder / "manifest.json").exists() and not rebuild:
        return TaskFolder(folder, json.loads((folder / "manifest.json").read_text()))
    books = {doc.name: book_sentences(doc.text) for doc in split_documents(corpus, "heldout")}
    manifest = {"corpus": corpus, "split": "heldout", "seed": seed, "size": size, "version": BUILD_VERSION,
                "chance": 1 / NUM_CHOICES, "tasks": {}}
    with atomic_output_dir(folder, overwrite=True) as tmp:
        for task in DEPTHKIT_TASKS:
            items, candidates = build_items(task, books, size, seed)
            if len(items) < size:
                raise DepthkitError(
                    f"corpus '{corpus}' (heldout split) yields only {len(items)} {task} items, {size} asked; "
                    "use a larger corpus or a smaller `task_size`"
                )
            data = tmp / f"{task}.jsonl"
            data.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
            write_task_yaml(task, tmp / f"{task}.yaml", folder / data.name)
            manifest["tasks"][task] = {"items": len(items), "candidates": candidates,
                                       "labels": label_balance(items)}
        write_json(tmp / "manifest.json", manifest)
    return TaskFolder(folder, manifest)


def write_task_yaml(task: str, path: Path, data_file: Path) -> None:
    """The package's YAML template for `task`, pointed at a JSONL file."""
    config = yaml.safe_load(resources.files(__package__).joinpath(TEMPLATES[task]).read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_file)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def read_items(path: Path) -> list[dict]:
    """Items of a task's JSONL file; an empty or unreadable file is an error, never 0 questions."""
    try:
        items = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise DepthkitError(f"cannot read task data {path}: {err}") from err
    if not items:
        raise DepthkitError(f"task data {path} is empty")
    return items


__all__ = ["DEPTHKIT_TASKS", "TaskFolder", "build_tasks", "read_items", "write_task_yaml"]
