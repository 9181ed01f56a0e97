"""Output helpers: strict JSON, and temporary folders that never outlive the run that made them."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthkit.utils.io import MARKER, OWNER, atomic_output_dir, json_text, write_json


def test_results_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    data = {"loss": math.nan, "ratio": math.inf, "steps": [1.5, -math.inf], "tensor": torch.tensor([1.0, math.nan]),
            "path": Path("a/b"), "nested": {"ok": 2}}
    text = write_json(tmp_path / "r.json", data).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "loss": None, "ratio": None, "steps": [1.5, None], "tensor": [1.0, None], "path": "a/b", "nested": {"ok": 2}}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        json_text({"x": object()})


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def debris(parent: Path, name: str, owner: str | None) -> Path:
    """A temporary folder as `atomic_output_dir` leaves it when its process is killed."""
    folder = parent / name
    folder.mkdir()
    (folder / "shard-00000.safetensors").write_bytes(b"half written")
    if owner is not None:
        (folder / OWNER).write_text(owner + "\n")
    return folder


def test_temporary_folders_of_killed_runs_are_removed_and_nothing_else(tmp_path, capsys):
    host = socket.gethostname()
    killed = debris(tmp_path, ".out.tmp-killed01", f"{host} {dead_pid()}")
    running = debris(tmp_path, ".out.tmp-running1", f"{host} {os.getpid()}")
    elsewhere = debris(tmp_path, ".out.tmp-otherhst", f"not-{host} {dead_pid()}")
    foreign = debris(tmp_path, ".out.tmp-noowner1", None)  # not depthkit's, or a run just starting
    other_output = debris(tmp_path, ".out2.tmp-killed02", f"{host} {dead_pid()}")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "result.json").write_text("{}")
    assert not killed.exists() and all(p.exists() for p in (running, elsewhere, foreign, other_output))
    assert "removed 1 temporary folder(s)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "result.json"]  # no owner file left


def test_a_failed_run_leaves_no_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out"):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_fetch_scratch_folders_of_killed_fetches_are_removed(tmp_path, capsys):
    """`depthkit fetch` works in `.fetch-*` folders of the cache; a SIGKILLed fetch's one goes at the next fetch."""
    from depthkit.utils.fetch import SCRATCH_PREFIX, scratch_dir

    killed = debris(tmp_path, f"{SCRATCH_PREFIX}killed", f"{socket.gethostname()} {dead_pid()}")
    running = debris(tmp_path, f"{SCRATCH_PREFIX}running", f"{socket.gethostname()} {os.getpid()}")
    foreign = debris(tmp_path, f"{SCRATCH_PREFIX}foreign", None)
    new = scratch_dir(tmp_path)
    assert not killed.exists() and running.exists() and foreign.exists() and new.is_dir()
    assert (new / OWNER).read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert "left by a killed run" in capsys.readouterr().err
