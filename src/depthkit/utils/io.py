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
    remove_stale_temp_dirs(out.parent, _temp_prefix(out), f"of {out}")
    tmp = owned_temp_dir(out.parent, _temp_prefix(out))
    try:
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


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder under `parent` carrying `OWNER` ("<host> <pid>" of this process)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return tmp


def remove_stale_temp_dirs(parent: Path, prefix: str, what: str) -> list[Path]:
    """Remove the temporary folders `parent/<prefix>*` left by runs that were killed; return them.

    Only folders whose `OWNER` names this machine and a process that no longer exists: a folder
    without an owner (not depthkit's, or a run just starting), a job still running, or one on
    another machine sharing the disk is kept.
    """
    if not parent.is_dir():
        return []
    stale = [folder for folder in parent.iterdir()
             if folder.name.startswith(prefix) and folder.is_dir() and _owner_is_gone(folder / OWNER)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        warn(f"removed {len(stale)} temporary folder(s) {what} left by a killed run: "
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
        check_writable(out)
        return out
    if not overwrite:
        raise DepthkitError(f"output folder {out} already exists; pass `overwrite` to replace it")
    if not out.is_dir():
        raise DepthkitError(f"output {out} exists and is not a folder; choose another path")
    if not (out / MARKER).exists() and any(out.iterdir()):
        raise DepthkitError(f"{out} was not written by depthkit (no {MARKER} in it), so `overwrite` will not "
                            "delete it; move it away or choose another output folder")
    return out


def check_output_file(path: str | Path) -> Path:
    """Refuse an output file that could not be written (a folder, a path under a file, a read-only
    place) before the work whose result it would hold, not after; an existing file is replaced."""
    path = Path(path)
    if path.is_dir():
        raise DepthkitError(f"output file {path} is a folder; give a file name")
    if not path.exists():
        check_writable(path)
    return path


def check_writable(path: Path) -> None:
    """Refuse `path` unless its nearest existing folder accepts a new file: probed by creating (and
    removing) one, since permission bits say nothing to root or about read-only mounts and /proc."""
    parent = path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise DepthkitError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise DepthkitError(f"cannot write {path}: {parent} does not accept new files ({err.strerror})") from None


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(data))
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, so that a kill mid-write never
    leaves a truncated file where a complete one is expected (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
