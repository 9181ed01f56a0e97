"""Resumable training checkpoints that are never half-written, in a folder that belongs to one run.

`accelerate`'s `save_state` writes into `ROOT/.partial-step-N`, which is renamed to `ROOT/step-N`
only after every process has finished writing: a run killed mid-save leaves a `.partial-*` folder
that the next run removes, never a valid-looking checkpoint. Only the trainable parameters of the
model are stored, plus optimizer, scheduler, RNG and progress state: frozen weights are rebuilt by
the code that starts the run. What defined the run is kept in `ROOT/settings.json`; resuming with
different settings is refused, since the result would be neither run, and a new run never starts
where another run's checkpoints are (they would mix).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator, PartialState

from depthkit.errors import DepthkitError

_STEP = re.compile(r"^step-(\d+)$")
SETTINGS_FILE = "settings.json"
# Settings that only change reporting or disk use, so a resumed run may change them.
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "keep_checkpoints"}


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _STEP.match(path.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def holds_checkpoints(root: Path) -> bool:
    """Whether `root` or a folder below it (one per stage of a run) holds a complete checkpoint."""
    return root.is_dir() and any(_STEP.match(path.name) for path in root.rglob("step-*"))


def checkpoints_beside(out: str | Path) -> Path:
    """The checkpoint folder of a run whose output is the folder `out`: `<out>.checkpoints`, beside it
    (the output is written atomically at the end, so its checkpoints cannot live inside it)."""
    out = Path(out)
    return out.with_name(f"{out.name}.checkpoints")


def check_new_run(root: Path, resume: bool) -> None:
    """Refuse to start a new run where an earlier run's checkpoints are: they would mix."""
    if not resume and holds_checkpoints(root):
        raise DepthkitError(f"{root} holds checkpoints of an earlier run: pass `resume` to continue it, "
                            "or remove the folder to start over")


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> Path:
    """Save the accelerate state for `step` atomically and keep only the newest `keep`."""
    final = root / f"step-{step:07d}"
    partial = root / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        for _, old in step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def claim(accelerator: Accelerator, root: Path, resume: bool, settings: dict[str, Any]) -> None:
    """Make `root` this run's: drop debris of interrupted saves, then either check that a resumed
    run has the saved settings, or refuse a new run where an earlier run's checkpoints are."""
    if accelerator.is_main_process:
        for path in root.rglob(".partial-*") if root.is_dir() else ():
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    check_new_run(root, resume)
    if resume:
        check_settings(root, settings)
    if latest_checkpoint(root) is None and accelerator.is_main_process:
        write_settings(root, settings)
    accelerator.wait_for_everyone()


def check_settings(root: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume with settings that differ from the saved ones."""
    path = root / SETTINGS_FILE
    if not path.exists():
        return
    saved = _flat(json.loads(path.read_text()))
    diffs = [f"{key}: {saved.get(key)} -> {value}" for key, value in _flat(settings).items()
             if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if diffs:
        raise DepthkitError(f"cannot resume from {root} with different settings ({'; '.join(diffs)}); "
                            "use the original settings or a new output folder")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings (a run's context) as dotted keys, so a refusal names the one that changed."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def write_settings(root: Path, settings: dict[str, Any]) -> None:
    """Written through a temporary file, so a kill never leaves a truncated settings file."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{SETTINGS_FILE}.tmp"
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, root / SETTINGS_FILE)


def remove_checkpoints(root: Path) -> None:
    """Once a run's output is written its checkpoints have served: remove the run's folder (on the
    main process, the others waiting)."""
    state = PartialState()
    if state.is_main_process:
        shutil.rmtree(root, ignore_errors=True)
    state.wait_for_everyone()

