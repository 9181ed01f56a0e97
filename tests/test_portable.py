"""Looped checkpoints that travel: a folder saved by depthkit loads in plain `transformers` (remote
code, depthkit not importable) with the same logits and the same greedy tokens, on every tiny
architecture, with the Recursive Connector, prelude/coda, and relaxed per-loop LoRA and norms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from depthkit.models.loading import load_model
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.recursive.generate import generate
from depthkit.recursive.model import BASE_DIR, WEIGHTS_FILE, RecursiveModel, tokenizer_folder
from depthkit.recursive.relaxed import relax

NEW_TOKENS = 6
# Runs in a fresh interpreter where `import depthkit` fails: only transformers and the folder's own file.
WITHOUT_DEPTHKIT = """
import json, sys
sys.modules["depthkit"] = None
import torch
from transformers import AutoModelForCausalLM
results = {}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    expected = torch.load(folder + "/expected.pt")
    ids = expected["ids"]
    gap = float((model(ids).logits - expected["logits"]).abs().max())
    tokens = model.generate(ids, max_new_tokens=expected["new_tokens"], do_sample=False)[0, ids.shape[1]:].tolist()
    results[folder] = {"gap": gap, "same_tokens": tokens == expected["tokens"]}
print(json.dumps(results))
"""


def looped_models(arch: str) -> dict[str, RecursiveModel]:
    """A wrapped model with connector, prelude and coda, and a relaxed one; adapters made non-trivial."""
    torch.manual_seed(0)
    wrapped = RecursiveModel.wrap(tiny_model(arch), ends=1, num_loops=3, connector_k=2)
    relaxed = relax(tiny_model(arch, num_layers=4), 2, rank=2)
    with torch.no_grad():
        wrapped.connector.scale.fill_(0.3)
        for lora in relaxed.adapters.relax.values():
            lora.lora_B.normal_(0, 0.05)
        for weight in relaxed.adapters.norms.values():
            weight.mul_(1.1)
    return {"wrapped": wrapped, "relaxed": relaxed}


def test_saved_looped_models_load_in_plain_transformers(tmp_path):
    tokenizer = load_model("tiny:llama")[1]
    ids = torch.randint(0, 200, (1, 11), generator=torch.Generator().manual_seed(1))
    folders = []
    for arch in TINY_ARCHITECTURES:
        for name, model in looped_models(arch).items():
            folder = tmp_path / f"{arch}-{name}"
            model.save_pretrained(folder, tokenizer)
            logits = model(ids).logits
            reloaded = RecursiveModel.from_pretrained(folder)
            assert torch.equal(reloaded(ids).logits, logits), (arch, name)
            assert not (folder / BASE_DIR).exists() and tokenizer_folder(folder) == folder
            torch.save({"ids": ids, "logits": logits, "tokens": generate(model, ids, NEW_TOKENS).new_tokens,
                        "new_tokens": NEW_TOKENS},
                       folder / "expected.pt")
            folders.append(str(folder))
    config = json.loads((tmp_path / "llama-wrapped" / "config.json").read_text())
    assert config["model_type"] == "depthkit_looped" and "AutoModelForCausalLM" in config["auto_map"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_DEPTHKIT, *folders], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["gap"] < 1e-5 and r["same_tokens"] for r in results.values()), results


def test_folders_of_the_earlier_layout_still_load(tmp_path):
    """depthkit <= 0.4 saved `base/` (a plain checkpoint) + `recursive.safetensors`."""
    model = looped_models("llama")["wrapped"]
    folder = tmp_path / "old"
    model.base.save_pretrained(folder / BASE_DIR)
    model.config.save(folder)
    save_file(model.extra_state_dict(), str(folder / WEIGHTS_FILE))
    ids = torch.randint(0, 200, (1, 9))
    assert torch.equal(RecursiveModel.from_pretrained(folder)(ids).logits, model(ids).logits)
    assert tokenizer_folder(folder) == folder / BASE_DIR


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_generation_config_and_cache_slots_travel(arch, tmp_path):
    model = looped_models(arch)["wrapped"]
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == model.num_slots(model.config.num_loops)
    assert (tmp_path / "m" / "generation_config.json").exists()
    assert (tmp_path / "m" / "modeling_depthkit_looped.py").exists()
