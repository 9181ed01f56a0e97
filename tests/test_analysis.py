import pytest
import torch

from depthkit.analysis import analyze_redundancy
from depthkit.analysis.metrics import angular_distance, block_influence, linear_cka
from tests.conftest import random_ids


def test_metrics_on_known_cases():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(x, -x) == pytest.approx(2.0, abs=1e-6)
    assert angular_distance(x, -x) == pytest.approx(1.0, abs=1e-3)
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    assert linear_cka(x, noise) < 0.3


def test_report_shapes(tiny):
    layers = tiny.config.num_hidden_layers
    report = analyze_redundancy(tiny, random_ids(tiny, batch=3, length=16), sample_tokens=40, progress=False)
    assert len(report.block_influence) == layers
    assert sorted(report.angular_distance) == [1, 2, 3, 4]
    assert [len(v) for v in report.angular_distance.values()] == [layers, layers - 1, layers - 2, layers - 3]
    cka = torch.tensor(report.cka)
    assert cka.shape == (layers + 1, layers + 1)
    torch.testing.assert_close(cka, cka.T)
    assert report.sampled_tokens == 40
    by_influence = sorted(range(layers), key=report.block_influence.__getitem__)
    assert report.lowest_influence(2) == sorted(by_influence[:2])


def test_sample_skips_the_first_positions(tiny):
    ids = random_ids(tiny, batch=2, length=5)
    report = analyze_redundancy(tiny, ids, sample_tokens=100, skip_first=2, progress=False)
    assert report.sampled_tokens == 2 * 3


def test_a_streamed_checkpoint_is_analysed_like_the_model_in_memory(tiny, tmp_path):
    """The analysis reads the model through the block runner: from disk one block at a time, the same report."""
    from depthkit.models.streaming import StreamingModel

    tiny.save_pretrained(tmp_path, max_shard_size="200KB")
    ids = random_ids(tiny, batch=3, length=16)
    in_memory = analyze_redundancy(tiny, ids, sample_tokens=40, progress=False)
    streamed = analyze_redundancy(StreamingModel.open(tmp_path, dtype="float32"), ids, sample_tokens=40,
                                  progress=False)
    assert streamed.block_influence == pytest.approx(in_memory.block_influence, abs=1e-6)
    torch.testing.assert_close(torch.tensor(streamed.cka), torch.tensor(in_memory.cka), atol=1e-5, rtol=1e-5)
