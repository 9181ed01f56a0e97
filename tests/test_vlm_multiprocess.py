"""Recursive VLM training through accelerate with two processes (DDP over gloo on CPU): the
gradients must be synchronised through the model's forward, and each process must get its own
share of the batches."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_process_vlm_training_keeps_the_processes_in_step():
    script = Path(__file__).with_name("multiprocess_vlm.py")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2
    assert result["max_weight_difference"] == 0.0
    first = result["first_losses"]
    assert first[0] != first[1]
