"""Shared fixtures: tiny random models of every architecture, and the real SmolLM2 (loaded once)."""

from __future__ import annotations

import pytest
import torch

from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny(request):
    """A tiny float32 model of each supported architecture, in turn."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in the fastest dtype here (converted once into the cache by `depthkit fetch`)."""
    from depthkit.models.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def pride_ids(smollm2):
    """Tokens of the start of Pride and Prejudice (the whole text split)."""
    from depthkit.data import DataSpec, token_stream

    return token_stream(smollm2[1], DataSpec("austen:prideprejudice", "all"))


def random_ids(model, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models gain nothing from more, and several threads
    collapse (spin-waiting) when the CPU is shared with other jobs. Restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interrupt_training(monkeypatch, at_step: int) -> None:
    """Make the shared training core raise KeyboardInterrupt at its `at_step`-th optimizer step
    (counted over every run after this call), as a kill would; `monkeypatch.undo()` ends it."""
    from depthkit.training.core import Trainer

    real_update, calls = Trainer._update, []

    def update(self, loss):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_update(self, loss)

    monkeypatch.setattr(Trainer, "_update", update)
