"""Resumable training checkpoints that are never half-written.

`accelerate`'s `save_state` writes into `checkpoints/.partial-step-N`, which is renamed to
`checkpoints/step-N` only after every process has finished writing: a run killed mid-save leaves
a `.partial-*` folder that resuming ignores (and removes), never a corrupt "latest" checkpoint.
Only the adapters (trainable parameters) of the model are stored, plus optimizer, scheduler, RNG
and progress state: the frozen base weights are reloaded from the model folder on resume.
The settings a run started with are kept in `checkpoints/settings.json`; resuming with
different training settings is refused, since the result would be neither run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from depthkit.errors import DepthkitError

_STEP = re.compile(r"^step-(\d+)$")
SETTINGS_FILE = "settings.json"
KEEP_LAST = 2
# Settings that only change reporting, so a resumed run may change them.
RESUMABLE_CHANGES = {"eval_every", "save_every"}


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _STEP.match(path.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def save_checkpoint(accelerator: Accelerator, root: Path, step: int) -> Path:
    """Save the accelerate state for `step` atomically and keep only the last `KEEP_LAST`."""
    final = root / f"step-{step:07d}"
    partial = root / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        for _, old in step_dirs(root)[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial(root: Path) -> None:
    """Drop leftovers of a save that was interrupted."""
    if root.is_dir():
        for path in root.glob(".partial-*"):
            shutil.rmtree(path, ignore_errors=True)


def check_settings(root: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume with training settings that differ from the saved ones."""
    path = root / SETTINGS_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    diffs = [f"{key}: {saved.get(key)} -> {value}" for key, value in settings.items()
             if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if diffs:
        raise DepthkitError(f"cannot resume from {root} with different settings ({'; '.join(diffs)}); "
                            "use the original settings or a new `out` folder")


def write_settings(root: Path, settings: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def keep_trainable_only(model_names: list[set[str]]):
    """A `save_state` pre-hook that drops frozen tensors from each model's saved state dict."""

    def hook(_models, weights, _output_dir) -> None:
        for names, state in zip(model_names, weights):
            for key in [k for k in state if k not in names]:
                del state[key]

    return hook
