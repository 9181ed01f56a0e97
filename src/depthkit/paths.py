"""Where depthkit keeps what it fetches or converts once (models, corpora).

One cache folder, `~/.cache/depthkit` by default, overridable with `DEPTHKIT_CACHE` so CI, tests
and users on shared machines can point it elsewhere.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root cache folder (created on first use)."""
    root = Path(os.environ.get("DEPTHKIT_CACHE", Path.home() / ".cache" / "depthkit")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(*parts: str) -> Path:
    """A folder under the cache root (created on first use)."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
