"""Output helpers: folders that appear only when complete, JSON results and readable tables."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from depthkit.errors import DepthkitError

# Written into every output folder: `--overwrite` replaces only folders that carry it (or empty
# ones), so a mistyped `--out .` or `--out ~/data` can never delete what depthkit did not write.
MARKER = ".depthkit-output"


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    A crash or an error leaves no half-written folder that looks valid: the temporary folder is
    removed and `out` is untouched. An existing `out` is refused unless `overwrite` is set and it
    is a folder depthkit wrote (`MARKER`) or an empty one.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
    """`data` as indented JSON text; tensors, arrays and paths become plain values."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
