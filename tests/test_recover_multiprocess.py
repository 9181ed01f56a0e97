"""Recovery through accelerate with two processes (DDP over gloo on CPU): the trainer's evaluation,
checkpointing, the gathered-state-dict merge and self-distillation's shared answer set must work on a
wrapped model, not just on one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_process_recovery_saves_the_model_it_evaluated(tmp_path):
    script = Path(__file__).with_name("multiprocess_recover.py")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2
    assert result["card_after"] < result["card_before"]
    assert result["saved"] == pytest.approx(result["card_after"], rel=1e-4)
    assert result["self_distill_steps"] == [4]
