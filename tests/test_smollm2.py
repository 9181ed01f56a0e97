"""Integration: the real SmolLM2-135M-Instruct on real text."""

import json

import pytest

from depthkit.cli.main import main
from depthkit.evaluate.perplexity import perplexity
from depthkit.utils.precision import fast_dtype
from tests.test_perplexity import direct_perplexity

pytestmark = pytest.mark.integration


def test_default_model_is_the_converted_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == fast_dtype()  # bf16 where this CPU multiplies it natively, else fp32
    assert tokenizer.decode(tokenizer("Pride and Prejudice")["input_ids"]) == "Pride and Prejudice"


@pytest.mark.parametrize("stride", [256, 128])
def test_perplexity_matches_transformers_on_pride_and_prejudice(smollm2, pride_ids, stride):
    model, _ = smollm2
    stream = pride_ids[:1024]
    result = perplexity(model, stream, window=256, stride=stride, batch_size=4, progress=False)
    expected = direct_perplexity(model, stream, 256, stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-3)
    assert 5 < result.perplexity < 100


def test_analyze_writes_json_and_figures(tmp_path):
    out = tmp_path / "analysis"
    argv = ["analyze", "--num-blocks", "2", "--block-len", "64", "--sample-tokens", "64", "--out", str(out)]
    code = main(argv)
    assert code == 0
    report = json.loads((out / "analysis.json").read_text())
    assert len(report["block_influence"]) == 30 and len(report["cka"]) == 31
    assert max(report["block_influence"]) > min(report["block_influence"]) > 0
    for png in ("cka.png", "depth.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert report["data"] == "mix [calib]"  # sampled over every domain by default, like calibration


def test_analyze_streamed_from_disk_gives_the_same_report(tmp_path):
    """`--offload disk` reads one block at a time from the checkpoint: the same figures as in memory."""
    argv = ["analyze", "--num-blocks", "2", "--block-len", "32", "--sample-tokens", "32"]
    reports = {}
    for offload in ("none", "disk"):
        assert main([*argv, "--offload", offload, "--out", str(tmp_path / offload)]) == 0
        reports[offload] = json.loads((tmp_path / offload / "analysis.json").read_text())
    assert reports["disk"]["block_influence"] == pytest.approx(reports["none"]["block_influence"], abs=1e-6)
    for disk_row, memory_row in zip(reports["disk"]["cka"], reports["none"]["cka"], strict=True):
        assert disk_row == pytest.approx(memory_row, abs=1e-5)
