"""Looped checkpoints that travel: a folder saved by depthkit loads in plain `transformers` (remote
code, depthkit not importable) with the same logits and the same greedy tokens, on every tiny
architecture, with the Recursive Connector, prelude/coda, and relaxed per-loop LoRA and norms; with
early exit, the same tokens and loops per token as depthkit's own decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from depthkit.errors import DepthkitError
from depthkit.models.loading import load_model
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.recursive import generate as generate_module
from depthkit.recursive.generate import GenerationResult, generate
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


def looped_models(arch: str, num_loops: int = 3, relaxed_layers: int = 4, sharing: str = "cycle"
                  ) -> dict[str, RecursiveModel]:
    """A wrapped model with connector, prelude and coda, and a relaxed one (`relaxed_layers` layers
    shared `sharing`-wise into half as many); adapters made non-trivial."""
    torch.manual_seed(0)
    wrapped = RecursiveModel.wrap(tiny_model(arch), ends=1, num_loops=num_loops, connector_k=2)
    relaxed = relax(tiny_model(arch, num_layers=relaxed_layers), relaxed_layers // 2, sharing, rank=2)
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


# Early exit through plain transformers: `generate`'s kwargs, the config's defaults, batches.
EXIT_TOKENS = 10
WITH_EARLY_EXIT = """
import json, sys
sys.modules["depthkit"] = None
import torch
from transformers import AutoModelForCausalLM
results = {}
for folder in sys.argv[1:]:
    expected = torch.load(folder + "/expected.pt")
    ids, new = expected["ids"], expected["new_tokens"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    run = lambda prompt, **kw: model.generate(prompt, max_new_tokens=new, do_sample=False, **kw)[:, prompt.shape[1]:]
    found = {}
    if "saved" in expected:  # a folder saved with an exit threshold: on by default, off when the config says so
        found["saved"] = run(ids)[0].tolist()
        found["saved_steps"] = model.steps_used[1:]
        model.config.exit_threshold = None
    else:  # a threshold given at load time, with the config's default rule (kl)
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                      exit_threshold=expected["thresholds"]["kl"])
        found["loaded"] = loaded.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist()
        found["loaded_steps"] = loaded.steps_used[1:]
    found["off"] = run(ids)[0].tolist()
    found["off_steps"] = model.steps_used
    for rule, threshold in expected["thresholds"].items():
        found[rule] = run(ids, exit_threshold=threshold, exit_rule=rule)[0].tolist()
        found[rule + "_steps"] = model.steps_used[1:]  # the prompt's forward first, then one per new token
    found["one_token_prompt"] = run(ids[:, :1], exit_threshold=expected["thresholds"]["hidden"],
                                    exit_rule="hidden")[0].tolist()
    found["one_token_prompt_steps"] = model.steps_used
    pair = torch.cat([ids, ids.flip(1)])
    found["batch_same"] = torch.equal(run(pair, exit_threshold=expected["thresholds"]["hidden"], exit_rule="hidden"),
                                      run(pair))
    found["batch_steps"] = model.steps_used
    try:
        model(ids, exit_threshold=1.0, exit_rule="entropy")
    except ValueError:
        found["bad_rule_refused"] = True
    results[folder] = found
print(json.dumps(results))
"""


def early_exit_models(arch: str) -> dict[str, RecursiveModel]:
    """Four loops (exits at step 2, 3 or none): a connector loop between a prelude and a coda, and a
    relaxed model (MIDDLE sharing: unique first and last layers) with per-loop LoRA and norms."""
    return looped_models(arch, num_loops=4, relaxed_layers=6, sharing="middle")


def mixed_exit_threshold(model: RecursiveModel, ids: torch.Tensor, rule: str, eos: int,
                         monkeypatch: pytest.MonkeyPatch) -> tuple[float, GenerationResult]:
    """A threshold at which depthkit's greedy decoding exits some tokens early and runs others to the
    end, taken between two distances that decoding without exit measures (so none of them sits on it)."""
    distances: list[float] = []
    measure = {"kl": "kl_divergence", "hidden": "hidden_change"}[rule]
    original = getattr(generate_module, measure)

    def recorded(*args: torch.Tensor) -> torch.Tensor:
        distance = original(*args)
        distances.append(float(distance.max()))
        return distance

    with monkeypatch.context() as patch:
        patch.setattr(generate_module, measure, recorded)
        generate(model, ids, EXIT_TOKENS, exit_threshold=0.0, exit_rule=rule, eos_token_id=eos)
    distances.sort()
    best = None
    for quantile in (0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8):
        index = int(quantile * (len(distances) - 1))
        threshold = (distances[index] * distances[index + 1]) ** 0.5
        result = generate(model, ids, EXIT_TOKENS, exit_threshold=threshold, exit_rule=rule, eos_token_id=eos)
        steps = result.loops.steps_used
        score = len(set(steps)) if max(steps) == model.config.num_loops > min(steps) else 0
        if best is None or score > best[0]:
            best = (score, threshold, result)
    assert best[0] >= 2, (rule, best)
    return best[1], best[2]


def test_early_exit_through_plain_transformers(tmp_path, monkeypatch):
    """Greedy decoding with early exit in the remote code gives depthkit's tokens and loops per token,
    for both rules (per-call kwargs, a threshold saved in the config or given at load time); off by
    default; a batch runs all R steps with the tokens of no exit."""
    from depthkit.recursive.modeling_depthkit_looped import EXIT_RULES, DepthkitLoopedConfig

    assert EXIT_RULES == generate_module.EXIT_RULES
    assert DepthkitLoopedConfig().exit_rule == generate_module.DEFAULT_EXIT_RULE
    tokenizer = load_model("tiny:llama")[1]
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    expected, folders = {}, []
    for arch in TINY_ARCHITECTURES:
        for name, model in early_exit_models(arch).items():
            eos = model.base.generation_config.eos_token_id
            folder = tmp_path / f"{arch}-{name}"
            want: dict = {"ids": ids, "new_tokens": EXIT_TOKENS, "thresholds": {}}
            seen = {"off": generate(model, ids, EXIT_TOKENS, eos_token_id=eos).new_tokens}
            for rule in EXIT_RULES:
                want["thresholds"][rule], result = mixed_exit_threshold(model, ids, rule, eos, monkeypatch)
                seen[rule], seen[rule + "_steps"] = result.new_tokens, result.loops.steps_used
            short = generate(model, ids[:, :1], EXIT_TOKENS, exit_threshold=want["thresholds"]["hidden"],
                             exit_rule="hidden", eos_token_id=eos)
            seen["one_token_prompt"] = short.new_tokens
            seen["one_token_prompt_steps"] = [model.config.num_loops, *short.loops.steps_used]
            if name == "relaxed":
                want["saved"] = True
                model.save_pretrained(folder, tokenizer, exit_threshold=want["thresholds"]["hidden"],
                                      exit_rule="hidden")
                config = json.loads((folder / "config.json").read_text())
                assert (config["exit_threshold"], config["exit_rule"]) == (want["thresholds"]["hidden"], "hidden")
            else:
                model.save_pretrained(folder, tokenizer)
            torch.save(want, folder / "expected.pt")
            expected[str(folder)] = seen
            folders.append(str(folder))
    done = subprocess.run([sys.executable, "-c", WITH_EARLY_EXIT, *folders], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, found in results.items():
        seen, loops = expected[folder], json.loads((Path(folder) / "config.json").read_text())["loop"]["num_loops"]
        assert found["off"] == seen["off"] and set(found["off_steps"]) == {loops}, folder
        for rule in ("kl", "hidden"):
            assert (found[rule], found[rule + "_steps"]) == (seen[rule], seen[rule + "_steps"]), (folder, rule)
        assert (found["one_token_prompt"], found["one_token_prompt_steps"]) == (
            seen["one_token_prompt"], seen["one_token_prompt_steps"]), folder
        assert found["batch_same"] and set(found["batch_steps"]) == {loops}, folder
        assert found.get("bad_rule_refused"), folder
        if "saved" in found:
            assert (found["saved"], found["saved_steps"]) == (seen["hidden"], seen["hidden_steps"]), folder
        else:
            assert (found["loaded"], found["loaded_steps"]) == (seen["kl"], seen["kl_steps"]), folder


def test_saving_refuses_a_bad_early_exit_default(tmp_path):
    model = looped_models("llama")["wrapped"]
    for bad in ({"exit_threshold": -1.0}, {"exit_threshold": 1e-3, "exit_rule": "entropy"}):
        with pytest.raises(DepthkitError, match="exit"):
            model.save_pretrained(tmp_path / "m", **bad)
        assert not (tmp_path / "m").exists()
