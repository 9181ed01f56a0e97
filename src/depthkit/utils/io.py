"""Output helpers: folders that appear only when complete, JSON results and readable tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from depthkit.errors import DepthkitError, warn

# Written into every output folder: `--overwrite` replaces only folders that carry it (or empty
# ones), so a mistyped `--out .` or `--out ~/data` can never delete what depthkit did not write.
MARKER = ".depthkit-output"
# Written into every temporary output folder while it is filled: "<host> <pid>" of the process
# that fills it, so a later run can tell the debris of a killed run from a job still working.
OWNER = ".depthkit-owner"


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    A crash or an error leaves no half-written folder that looks valid: the temporary folder is
    removed and `out` is untouched. An existing `out` is refused unless `overwrite` is set and it
    is a folder depthkit wrote (`MARKER`) or an empty one. SIGKILL lets no handler run, so the
    temporary folders of killed runs with the same `out` are removed here (`remove_stale_temp_dirs`).
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / MARKER).write_text("written by depthkit; `--overwrite` may replace this folder\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        check_output_dir(out, overwrite)  # it may have changed while we worked
        shutil.rmtree(out)
    tmp.rename(out)
    (out / OWNER).unlink()  # after the rename: a kill in between leaves a complete `out`, not debris


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the temporary folders of `out` left by runs that were killed; return them.

    Only folders named like `atomic_output_dir`'s for this very `out` whose `OWNER` names this
    machine and a process that no longer exists: a folder without an owner (not depthkit's, or a
    run just starting), a job still running, or one on another machine sharing the disk is kept.
    """
    if not out.parent.is_dir():
        return []
    stale = [folder for folder in out.parent.iterdir()
             if folder.name.startswith(_temp_prefix(out)) and folder.is_dir() and _owner_is_gone(folder / OWNER)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        warn(f"removed {len(stale)} temporary folder(s) of {out} left by a killed run: "
             + ", ".join(folder.name for folder in stale))
    return stale


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _owner_is_gone(owner: Path) -> bool:
    try:
        host, pid = owner.read_text().split()
        pid_number = int(pid)
    except (OSError, ValueError):
        return False
    return host == socket.gethostname() and not _process_exists(pid_number)


def _process_exists(pid: int) -> bool:
    """True while `pid` runs (or is a zombie); a recycled pid errs on the safe side: the folder stays."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output folder unless `overwrite` and depthkit wrote it (or it is empty);
    call it before long work, not after."""
    out = Path(out)
    if not out.exists():
        return out
    if not overwrite:
        raise DepthkitError(f"output folder {out} already exists; pass `overwrite` to replace it")
    if not out.is_dir():
        raise DepthkitError(f"output {out} exists and is not a folder; choose another path")
    if not (out / MARKER).exists() and any(out.iterdir()):
        raise DepthkitError(f"{out} was not written by depthkit (no {MARKER} in it), so `overwrite` will not "
                            "delete it; move it away or choose another output folder")
    return out


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(data))
    return path


def json_text(data: Any) -> str:
    """`data` as indented, strict JSON text (`json_safe`)."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def json_safe(data: Any) -> Any:
    """`data` with tensors, arrays and paths as plain values and NaN or infinite floats as null.

    Python writes non-finite floats as bare `NaN`/`Infinity`, which is not JSON: `jq`, browsers
    and most other languages refuse the whole file. A diverged loss or an undefined ratio is
    "no number", which JSON spells null.
    """
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, (str, int, bool)) or data is None:
        return data
    if hasattr(data, "tolist"):
        return json_safe(data.tolist())
    if isinstance(data, Path):
        return str(data)
    raise TypeError(f"not JSON serialisable: {type(data).__name__}")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows of dicts as a GitHub-markdown table (readable in a terminal too)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_format_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
