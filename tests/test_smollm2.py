"""Integration: the real SmolLM2-135M-Instruct on real text."""

import copy
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


@pytest.fixture(scope="module")
def smollm2_float32(smollm2):
    return copy.deepcopy(smollm2[0]).float()


@pytest.mark.parametrize("stride", [256, 128])
def test_perplexity_matches_transformers_on_pride_and_prejudice(smollm2, smollm2_float32, pride_ids, stride):
    """Exact in float32, batched against transformers' one window at a time. In bf16 the GEMMs round
    differently with the batch's shape (logits differ by 0.12 on average between batch 4 and 1, the
    perplexities by 1.4e-3), so the default dtype is held to bf16's precision, 5e-3."""
    stream = pride_ids[:1024]
    exact = perplexity(smollm2_float32, stream, window=256, stride=stride, batch_size=4, progress=False)
    assert exact.perplexity == pytest.approx(direct_perplexity(smollm2_float32, stream, 256, stride), rel=1e-5)
    fast = perplexity(smollm2[0], stream, window=256, stride=stride, batch_size=4, progress=False)
    assert fast.perplexity == pytest.approx(direct_perplexity(smollm2[0], stream, 256, stride), rel=5e-3)
    assert fast.perplexity == pytest.approx(exact.perplexity, rel=5e-3)
    assert 5 < fast.perplexity < 100


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
