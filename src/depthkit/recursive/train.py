"""Training a recursive model: every step's logits, a recursion loss, on the shared training core.

The optimizer loop, warm-up + cosine schedule, clipping and resumable checkpoints are
`depthkit.training`'s; it runs under `accelerate`, so the same code runs on one CPU, one GPU or
several (DDP/FSDP) depending on how it is launched (`accelerate launch` + its config).
Weights stay float32 and `mixed_precision="bf16"` autocasts the matmuls (bf16 weights cannot
hold small Adam updates); the default "auto" does so only where bf16 is native to the device
(`depthkit.utils.precision`), since emulated bf16 is slower than float32. Held-out perplexity of
EVERY step 1..R is measured every `eval_every` optimizer steps, because a recursive model is only
useful if all depths are good. With a `checkpoint_dir`, a resumable checkpoint is saved every
`checkpoint_every` steps and at the last, so a long run is never lost to a crash; the caller removes
the folder once the trained model is saved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from depthkit.errors import require
from depthkit.recursive.config import check_loops
from depthkit.recursive.loss import LOSSES, step_losses, token_losses
from depthkit.recursive.model import RecursiveModel
from depthkit.training import Progress, Trainer, TrainingSettings, cycled, due
from depthkit.utils.precision import MIXED_PRECISIONS, resolve_mixed_precision

PARTS = ("connector", "layers", "lora", "loop_lora")


@dataclass
class RecursiveTrainSettings(TrainingSettings):
    """Everything that defines a recursive training run (recorded in the results, compared on resume)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    loops: int = 3
    connector_lr: float = 1e-3
    loss: str = "monotonic"
    beta: float = 2.0
    detach: bool = True
    trainable: tuple[str, ...] = ("connector", "layers")
    eval_every: int = 50
    eval_batch_size: int = 4
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # resolved when training starts; the history records the result

    def validate(self) -> None:
        super().validate()
        check_loops(self.loops)
        require(self.connector_lr > 0, f"`connector_lr` must be > 0, got {self.connector_lr}")
        require(self.loss in LOSSES, f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}")
        unknown = [p for p in self.trainable if p not in PARTS]
        require(not unknown, f"unknown trainable part {unknown}; choose from {', '.join(PARTS)}")
        require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        require(self.mixed_precision in MIXED_PRECISIONS,
                f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{self.mixed_precision}'")


@dataclass
class TrainResult:
    settings: dict
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def select_trainable(model: RecursiveModel, parts: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the named parts; an empty selection is an error."""
    model.requires_grad_(False)
    modules: dict[str, list[nn.Module]] = {
        "connector": [model.connector] if model.connector is not None else [],
        "layers": list(model.layers),
        "lora": [model.adapters.shared] if len(model.adapters.shared) else [],
        "loop_lora": [m for m in (model.adapters.relax, model.adapters.norms) if len(m)],
    }
    for part in parts:
        require(part in modules, f"unknown trainable part '{part}'; choose from {', '.join(PARTS)}")
        require(len(modules[part]) > 0, f"this model has no '{part}' to train")
        for module in modules[part]:
            module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    require(len(params) > 0, "nothing to train")
    return params


@torch.no_grad()
def step_perplexities(model: RecursiveModel, blocks: torch.Tensor, loops: int, batch_size: int = 4,
                      autocast: Accelerator | None = None) -> list[float]:
    """Held-out perplexity after each step 1..R (fixed token blocks, every token but the first scored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals, count = [0.0] * model.config.num_steps(loops), 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start: start + batch_size].to(device)
        # one step's logits at a time: memory does not grow with the number of loops
        with autocast.autocast() if autocast is not None else contextlib.nullcontext():
            for out in model.iter_steps(ids, loops, decode_all=True):
                totals[out.step] += float(token_losses(out.logits, ids)[0].sum())
        count += ids.shape[0] * (ids.shape[1] - 1)
    model.train(was_training)
    return [math.exp(total / count) for total in totals]


def train(model: RecursiveModel, train_blocks: torch.Tensor, eval_blocks: torch.Tensor | None,
          settings: RecursiveTrainSettings, accelerator: Accelerator | None = None, progress: bool = True,
          checkpoint_dir: str | Path | None = None, resume: bool = False,
          context: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place on `train_blocks` (n x len token ids) and return the history.

    `checkpoint_dir`, `resume` and `context` (what else defines the run) are the training core's.
    """
    settings.validate()
    set_seed(settings.seed)
    settings = replace(settings, mixed_precision=resolve_mixed_precision(settings.mixed_precision))
    accelerator = accelerator or Accelerator(mixed_precision=settings.mixed_precision)
    params = select_trainable(model, settings.trainable)
    trainable = sum(p.numel() for p in params)
    if settings.steps == 0:
        return TrainResult(asdict(settings), trainable_parameters=trainable)
    state = Progress()
    trainer = Trainer(settings, accelerator, checkpoint_dir, resume, state, context)
    model.gradient_checkpointing = settings.gradient_checkpointing
    connector_ids = {id(p) for p in model.connector.parameters()} if model.connector is not None else set()
    groups = [{"params": [p for p in params if id(p) not in connector_ids], "lr": settings.lr},
              {"params": [p for p in params if id(p) in connector_ids], "lr": settings.connector_lr}]
    loader = DataLoader(TensorDataset(train_blocks), batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed), drop_last=True)
    require(len(loader) > 0, f"need at least {settings.batch_size} training blocks, got {train_blocks.shape[0]}")
    prepared, loader = trainer.prepare(model, [g for g in groups if g["params"]], loader)
    all_steps = settings.loss != "last"

    def evaluate(step: int) -> None:
        if eval_blocks is not None:
            ppl = step_perplexities(model, eval_blocks, settings.loops, settings.eval_batch_size, accelerator)
            state.evals.append({"step": step, "perplexity": ppl})
            tqdm.write(f"step {step}: held-out perplexity per recursion step " + ", ".join(f"{p:.2f}" for p in ppl))

    def loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        (ids,) = batch
        with accelerator.autocast():
            out = prepared(ids, settings.loops, return_all_steps=all_steps)
        losses = step_losses(out.step_logits if all_steps else [out.logits], ids, settings.loss, settings.beta,
                             settings.detach)
        return losses.loss, {"loss": float(losses.loss.detach()), "step_ce": losses.per_step}

    def after_step(step: int) -> None:
        if due(step, settings.eval_every, settings.steps):
            evaluate(step)
            prepared.train()

    if state.step == 0:
        evaluate(0)
    prepared.train()
    trainer.run(lambda start: cycled(loader, start), loss, after_step, desc="recursive train", show=progress)
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drop the autocast forward wrapper
    model.eval()
    model.gradient_checkpointing = False
    return TrainResult(asdict(settings), state.history, state.evals, trainable, state.seconds)
