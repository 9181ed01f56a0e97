"""Evaluation at depth R keeps what one step needs, whatever R: memory does not grow with loops."""

import weakref

import torch

from depthkit.models.tiny import tiny_model
from depthkit.recursive import RecursiveModel
from depthkit.recursive.generate import early_exit_nll
from depthkit.recursive.train import step_perplexities


def most_live_logits(monkeypatch, model: RecursiveModel, run) -> int:
    """The most decoded step logits alive at once while `run()` works."""
    live, most = weakref.WeakSet(), [0]
    decode = RecursiveModel.decode

    def tracked(self, hidden, logits_to_keep=0):
        logits = decode(self, hidden, logits_to_keep)
        live.add(logits)
        most[0] = max(most[0], len(live))
        return logits

    monkeypatch.setattr(RecursiveModel, "decode", tracked)
    run()
    return most[0]


def test_step_perplexities_hold_one_step_of_logits(monkeypatch):
    torch.manual_seed(0)
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=4), num_loops=2)
    blocks = torch.randint(0, model.base.config.vocab_size, (2, 16))
    assert most_live_logits(monkeypatch, model, lambda: step_perplexities(model, blocks, 12)) <= 2


def test_early_exit_scoring_holds_one_step_of_logits(monkeypatch):
    torch.manual_seed(0)
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=4), num_loops=2)
    stream = torch.randint(0, model.base.config.vocab_size, (40,))
    run = lambda: early_exit_nll(model, stream, 12, 1e-9, window=16, max_windows=1, progress=False)  # noqa: E731
    assert most_live_logits(monkeypatch, model, run) <= 2
