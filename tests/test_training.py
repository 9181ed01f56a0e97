"""The shared training core on a toy regression: schedule, clipping setting, checkpoints that are never
half-written, and refusals (another run's checkpoints, different settings or context)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from depthkit.errors import DepthkitError
from depthkit.training import Trainer, TrainingSettings, checkpoints_beside, cycled, warmup_cosine
from depthkit.training.checkpoints import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToySettings(TrainingSettings):
    steps: int = 6
    lr: float = 1e-2
    batch_size: int = 4


def toy_run(settings: ToySettings, folder=None, resume: bool = False, context: dict | None = None) -> Trainer:
    """Linear regression on 12 random points through the core (3 shuffled batches per epoch)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    points = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(points, points.sum(-1, keepdim=True)), batch_size=settings.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(settings.seed))
    trainer = Trainer(settings, Accelerator(cpu=True), folder, resume, context=context)
    prepared, loader = trainer.prepare(model, list(model.parameters()), loader)

    def loss(batch):
        value = (prepared(batch[0]) - batch[1]).pow(2).mean()
        return value, {"loss": float(value.detach())}

    trainer.run(lambda start: cycled(loader, start), loss, show=False)
    return trainer


def test_warmup_then_cosine_to_zero_scaled_by_processes():
    factor = warmup_cosine(steps=10, warmup_steps=3)
    assert [factor(k) for k in range(3)] == [0.25, 0.5, 0.75]  # no step at 0, the peak reached after
    assert factor(3) == 1.0 and factor(10) == pytest.approx(0.0)
    assert all(factor(k) > factor(k + 1) for k in range(3, 10))
    two = warmup_cosine(steps=10, warmup_steps=3, processes=2)  # a prepared scheduler steps once per process
    assert [two(2 * k) for k in range(10)] == pytest.approx([factor(k) for k in range(10)], abs=0.2)
    assert two(20) == pytest.approx(0.0)


def test_clipping_is_a_setting(monkeypatch):
    norms = []
    real = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, norm: norms.append(norm) or
                        real(self, params, norm))
    toy_run(ToySettings(steps=2, max_grad_norm=0.5))
    toy_run(ToySettings(steps=2, max_grad_norm=0))
    assert norms == [0.5, 0.5]
    with pytest.raises(DepthkitError, match="max_grad_norm"):
        ToySettings(max_grad_norm=-1).validate()


def test_an_interrupted_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, monkeypatch):
    folder = checkpoints_beside(tmp_path / "toy")
    assert folder == tmp_path / "toy.checkpoints"
    real_save = Accelerator.save_state

    def killed_while_writing(self, output_dir, **kwargs):
        if output_dir.endswith("step-0000004"):
            (tmp_path / "toy.checkpoints" / ".partial-step-0000004").mkdir()
            (tmp_path / "toy.checkpoints" / ".partial-step-0000004" / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        toy_run(ToySettings(checkpoint_every=2), folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == [".partial-step-0000004", "settings.json", "step-0000002"]
    assert latest_checkpoint(folder).name == "step-0000002"
    resumed = toy_run(ToySettings(checkpoint_every=2), folder, resume=True)
    assert not list(folder.glob(".partial-*")) and resumed.progress.step == 6
    straight = toy_run(ToySettings())
    assert resumed.progress.history == straight.progress.history


def test_resume_refuses_another_context(tmp_path):
    folder = tmp_path / "toy.checkpoints"
    toy_run(ToySettings(checkpoint_every=3), folder, context={"model": "a"})
    with pytest.raises(DepthkitError, match="context.model: a -> b"):
        toy_run(ToySettings(checkpoint_every=3), folder, resume=True, context={"model": "b"})
    finished = toy_run(ToySettings(checkpoint_every=2, keep_checkpoints=1), folder, resume=True,
                       context={"model": "a"})  # checkpoint frequency and rotation may change
    assert len(finished.progress.history) == 6  # resumed at its last step: nothing more to train
