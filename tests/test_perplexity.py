import math

import pytest
import torch

from depthkit.errors import DepthkitError
from depthkit.evaluate.perplexity import perplexity, window_starts
from depthkit.models.tiny import tiny_model


def direct_perplexity(model, stream, window, stride):
    """Reference: transformers' own loss over the same windows (HF perplexity-guide labels)."""
    total, count = 0.0, 0
    for start in range(0, stream.numel() - window + 1, stride):
        ids = stream[start : start + window].unsqueeze(0)
        labels = ids.clone()
        if start > 0:
            labels[:, : window - stride] = -100
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        total += loss * scored
        count += scored
    return math.exp(total / count)


@pytest.mark.parametrize("stride", [32, 16])
def test_matches_transformers_loss(tiny, stride):
    stream = torch.randint(0, tiny.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    result = perplexity(tiny, stream, window=32, stride=stride, batch_size=3, progress=False)
    expected = direct_perplexity(tiny, stream, 32, stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.windows == len(window_starts(150, 32, stride))


def test_bad_windows(tiny):
    stream = torch.arange(40)
    with pytest.raises(DepthkitError, match="less than one window"):
        perplexity(tiny, stream, window=64, progress=False)
    with pytest.raises(DepthkitError, match="larger than the model's context"):
        perplexity(tiny, stream, window=100_000, progress=False)
    with pytest.raises(DepthkitError, match="stride"):
        perplexity(tiny, stream, window=16, stride=32, progress=False)


def test_a_prefix_starts_every_window_and_is_never_scored():
    model = tiny_model("llama")
    stream = torch.randint(3, 256, (70,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, stream, window=32, progress=False, prefix=[1])
    nll, count = 0.0, 0
    for start in (0, 31):  # windows of 1 + 31 stream tokens
        ids = torch.cat([torch.tensor([1]), stream[start: start + 31]])[None]
        with torch.no_grad():
            nll += float(model(ids, labels=ids).loss) * 31
        count += 31
    assert result.windows == 2 and result.tokens_scored == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
