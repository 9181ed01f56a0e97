"""The one training loop: recovery, recursive and VLM training all run through `Trainer`.

It owns what they share: AdamW with linear warm-up and cosine decay, gradient clipping, the
optimizer step under `accelerate` (one CPU, one GPU or several processes, as launched), and
resumable checkpoints (`checkpoints.py`) every `checkpoint_every` steps and at the last. A task
brings its model, its batches and its loss; its settings subclass `TrainingSettings`.

A resumed run is the run an uninterrupted one would have been: the checkpoint restores the trainable
weights, optimizer, scheduler, RNG and `Progress`, and the batches before it are drawn again, not
jumped over (`cycled`). Give each run its own `Accelerator`: it saves everything it has prepared.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from depthkit.errors import require
from depthkit.training.checkpoints import claim, latest_checkpoint, save_checkpoint

Batches = Callable[[int], Iterable[Any]]
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class TrainingSettings:
    """The knobs every training run has. Each task's settings subclass it and give `steps`, `lr`
    and `batch_size` their own measured defaults; the others have their one default here."""

    steps: int
    lr: float
    batch_size: int  # per process
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 = none
    seed: int = 0
    checkpoint_every: int = 50  # with a checkpoint folder: every N optimizer steps and at the last (0 = never)
    keep_checkpoints: int = 2  # the newest N are kept while training

    def validate(self) -> None:
        require(self.steps >= 0, f"`steps` must be >= 0, got {self.steps}")
        require(self.lr > 0, f"`lr` must be > 0, got {self.lr}")
        require(self.batch_size >= 1, f"`batch_size` must be >= 1, got {self.batch_size}")
        require(self.warmup_steps >= 0, f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        require(self.max_grad_norm >= 0, f"`max_grad_norm` must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        require(self.checkpoint_every >= 0, f"`checkpoint_every` must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, f"`keep_checkpoints` must be >= 1, got {self.keep_checkpoints}")


@dataclass
class Progress:
    """Where a run stands beyond weights, optimizer and RNG. Registered with accelerate, so it is
    checkpointed with them and a resumed run reports its whole history."""

    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def warmup_cosine(steps: int, warmup_steps: int, processes: int = 1) -> Callable[[int], float]:
    """The learning-rate factor: linear warm-up (step k of the warm-up at k / (warmup + 1), so no
    step is wasted at 0), then cosine decay to zero. A prepared scheduler is stepped once per
    process per optimizer step (accelerate's convention), hence the scaling by `processes`."""
    total, warmup = steps * processes, warmup_steps * processes

    def factor(count: int) -> float:
        if count < warmup:
            return (count + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (count - warmup) / max(1, total - warmup))))

    return factor


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps and at the last (0 = never) is due at `step`."""
    return every > 0 and (step % every == 0 or step == total)


def cycled(loader: Iterable[Any], start: int = 0) -> Iterator[Any]:
    """The loader's batches epoch after epoch, from batch `start` on. The batches before `start` are
    drawn, not jumped over, so a shuffling loader's epochs come out as in an uninterrupted run."""
    require(len(loader) > 0, "no training batch: fewer training examples than one batch")  # type: ignore[arg-type]
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), start, None)


class Trainer:
    """One training run: claims its checkpoint folder at once (before any work), then `prepare`
    and `run`. Without `checkpoint_dir` nothing is saved and nothing can be resumed."""

    def __init__(self, settings: TrainingSettings, accelerator: Accelerator, checkpoint_dir: str | Path | None = None,
                 resume: bool = False, progress: Progress | None = None, context: dict[str, Any] | None = None):
        """`context`: what else defines the run (model, data), saved and compared on resume like `settings`."""
        settings.validate()
        require(checkpoint_dir is not None or not resume, "`resume` needs a checkpoint folder")
        self.settings, self.accelerator, self.resume = settings, accelerator, resume
        self.progress = progress if progress is not None else Progress()
        self.root = None if checkpoint_dir is None else Path(checkpoint_dir)
        if self.root is not None:
            record = {**asdict(settings), "processes": accelerator.num_processes, "context": context or {}}
            claim(accelerator, self.root, resume, record)

    def prepare(self, model: nn.Module, params: list[Any], *others: Any) -> tuple[Any, ...]:
        """AdamW over `params` (tensors, or groups with their own `lr`) with the warm-up + cosine
        schedule, prepared by accelerate with `model` and `others` (data loaders); when resuming,
        the latest checkpoint is loaded into them. Returns the prepared model and `others`."""
        settings, accelerator = self.settings, self.accelerator
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = warmup_cosine(settings.steps, settings.warmup_steps, accelerator.num_processes)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        model, self.optimizer, *others, self.scheduler = accelerator.prepare(model, optimizer, *others, scheduler)
        self.params = [p for p in model.parameters() if p.requires_grad]
        accelerator.register_for_checkpointing(self.progress)
        accelerator.register_save_state_pre_hook(self._keep_trainable_only)
        latest = latest_checkpoint(self.root) if self.resume and self.root is not None else None
        if latest is not None:
            accelerator.load_state(str(latest), strict=False)
            accelerator.print(f"resuming from {latest} (step {self.progress.step} of {settings.steps})")
        return (model, *others)

    def _keep_trainable_only(self, models: list[nn.Module], weights: list[dict[str, Any]], _folder: str) -> None:
        """A `save_state` pre-hook: frozen weights are not saved (the run's code rebuilds them)."""
        for model, state in zip(models, weights):
            unwrapped = self.accelerator.unwrap_model(model)
            trainable = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trainable]:
                del state[key]

    def run(self, batches: Batches, loss: LossFn, after_step: Callable[[int], None] | None = None,
            desc: str = "train", show: bool = True) -> Progress:
        """Optimizer steps from `progress.step` to `settings.steps`. `batches(start)` yields this
        process's batches from step `start` on; `loss(batch)` returns the loss to minimise and what
        to record of it; `after_step(step)` (evaluation) runs before the step's checkpoint."""
        settings, accelerator, state = self.settings, self.accelerator, self.progress
        bar = tqdm(total=settings.steps, initial=state.step, desc=desc, unit="step",
                   disable=not (show and accelerator.is_local_main_process))
        began = time.perf_counter() - state.seconds
        for batch in itertools.islice(batches(state.step), settings.steps - state.step):
            value, record = loss(batch)
            self._update(value)
            state.step += 1
            state.history.append({"step": state.step, "lr": self.scheduler.get_last_lr()[0], **record})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float)})
            if after_step is not None:
                after_step(state.step)
            state.seconds = time.perf_counter() - began
            if self.root is not None and due(state.step, settings.checkpoint_every, settings.steps):
                save_checkpoint(accelerator, self.root, state.step, settings.keep_checkpoints)
        bar.close()
        require(state.step == settings.steps,
                f"the training batches ran out after {state.step} of {settings.steps} steps")
        return state

    def _update(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss`, gradients clipped to `max_grad_norm`."""
        self.accelerator.backward(loss)
        if self.settings.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
