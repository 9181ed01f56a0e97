"""Training a recursive model: every step's logits, a recursion loss, driven by `accelerate`.

The loop is plain PyTorch wrapped by `Accelerator`, so the same code runs on one CPU, one GPU or
several (DDP/FSDP) depending on how it is launched (`accelerate launch` + its config).
Weights stay float32 and `mixed_precision="bf16"` autocasts the matmuls (bf16 weights cannot
hold small Adam updates); the default "auto" does so only where bf16 is native to the device
(`depthkit.utils.precision`), since emulated bf16 is slower than float32. Held-out perplexity of
EVERY step 1..R is measured every `eval_every` optimizer steps, because a recursive model is only
useful if all depths are good. With `checkpoint_every`, the model is saved every so many steps (and
at the end) as a reloadable `RecursiveModel.save_pretrained` folder (safetensors), so a long run is
never lost to a crash.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from depthkit.errors import require
from depthkit.recursive.config import check_loops
from depthkit.recursive.loss import LOSSES, step_losses, token_losses
from depthkit.recursive.model import RecursiveModel
from depthkit.utils.precision import MIXED_PRECISIONS, resolve_mixed_precision

PARTS = ("connector", "layers", "lora", "loop_lora")


@dataclass
class TrainSettings:
    """Everything that defines a training run (recorded in the results)."""

    steps: int = 100
    loops: int = 3
    batch_size: int = 4
    lr: float = 1e-4
    connector_lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "monotonic"
    beta: float = 2.0
    detach: bool = True
    trainable: tuple[str, ...] = ("connector", "layers")
    eval_every: int = 50
    eval_batch_size: int = 4
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # resolved when training starts; the history records the result
    seed: int = 0
    checkpoint_every: int = 0  # save every N optimizer steps and at the end (0 = never)
    checkpoint_dir: str | None = None  # checkpoints go to <checkpoint_dir>/step-<N>

    def validate(self) -> None:
        require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        check_loops(self.loops)
        require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        require(self.lr > 0 and self.connector_lr > 0, "learning rates must be > 0")
        require(self.loss in LOSSES, f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}")
        unknown = [p for p in self.trainable if p not in PARTS]
        require(not unknown, f"unknown trainable part {unknown}; choose from {', '.join(PARTS)}")
        require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        require(self.mixed_precision in MIXED_PRECISIONS,
                f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{self.mixed_precision}'")
        check_checkpointing(self.checkpoint_every, self.checkpoint_dir)


def check_checkpointing(every: int, folder: str | None) -> None:
    """The `checkpoint_every` / `checkpoint_dir` pair of a training run (recursive LM or VLM)."""
    require(every >= 0, f"checkpoint_every must be >= 0, got {every}")
    require(every == 0 or folder, "checkpoint_every needs a checkpoint_dir")


def save_periodic(save: Callable[[Path], Path], step: int, total: int, every: int, folder: str | None,
                  accelerator: Accelerator) -> str | None:
    """Every `every` steps and at the last, `save(<folder>/step-<N>)` on the main process while the
    others wait; returns the folder written (None when nothing was saved on this process)."""
    if not every or (step % every and step != total):
        return None
    written = str(save(Path(folder) / f"step-{step}")) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return written


@dataclass
class TrainResult:
    settings: dict
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0
    checkpoints: list[str] = field(default_factory=list)

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
    totals, count = None, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start: start + batch_size].to(device)
        if autocast is not None:
            with autocast.autocast():
                out = model(ids, loops, return_all_steps=True)
        else:
            out = model(ids, loops, return_all_steps=True)
        sums = [float(token_losses(logits, ids)[0].sum()) for logits in out.step_logits]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        count += ids.shape[0] * (ids.shape[1] - 1)
    model.train(was_training)
    return [math.exp(total / count) for total in totals]


def train(model: RecursiveModel, train_blocks: torch.Tensor, eval_blocks: torch.Tensor | None,
          settings: TrainSettings, accelerator: Accelerator | None = None, progress: bool = True) -> TrainResult:
    """Train `model` in place on `train_blocks` (n x len token ids) and return the history."""
    settings.validate()
    set_seed(settings.seed)
    settings = replace(settings, mixed_precision=resolve_mixed_precision(settings.mixed_precision))
    accelerator = accelerator or Accelerator(mixed_precision=settings.mixed_precision)
    params = select_trainable(model, settings.trainable)
    result = TrainResult(asdict(settings), trainable_parameters=sum(p.numel() for p in params))
    began = time.perf_counter()
    if settings.steps == 0:
        return result
    model.gradient_checkpointing = settings.gradient_checkpointing
    connector_ids = {id(p) for p in model.connector.parameters()} if model.connector is not None else set()
    groups = [{"params": [p for p in params if id(p) not in connector_ids], "lr": settings.lr},
              {"params": [p for p in params if id(p) in connector_ids], "lr": settings.connector_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    loader = DataLoader(TensorDataset(train_blocks), batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed), drop_last=True)
    require(len(loader) > 0, f"need at least {settings.batch_size} training blocks, got {train_blocks.shape[0]}")
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    all_steps = settings.loss != "last"

    def evaluate(step: int) -> None:
        if eval_blocks is not None:
            ppl = step_perplexities(model, eval_blocks, settings.loops, settings.eval_batch_size, accelerator)
            result.evaluations.append({"step": step, "perplexity": ppl})
            bar.write(f"step {step}: held-out perplexity per recursion step " + ", ".join(f"{p:.2f}" for p in ppl))

    def save_checkpoint(step: int) -> None:
        folder = save_periodic(partial(model.save_pretrained, overwrite=True), step, settings.steps,
                               settings.checkpoint_every, settings.checkpoint_dir, accelerator)
        if folder:
            result.checkpoints.append(folder)

    bar = tqdm(total=settings.steps, desc="recursive train", unit="step", disable=not progress)
    evaluate(0)
    prepared.train()
    step, batches = 0, iter(loader)
    while step < settings.steps:
        try:
            (ids,) = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        with accelerator.autocast():
            out = prepared(ids, settings.loops, return_all_steps=all_steps)
        losses = step_losses(out.step_logits if all_steps else [out.logits], ids, settings.loss, settings.beta,
                             settings.detach)
        accelerator.backward(losses.loss)
        accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = float(losses.loss.detach())
        result.history.append({"step": step, "loss": loss, "step_ce": losses.per_step})
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            evaluate(step)
            prepared.train()
        save_checkpoint(step)
    bar.close()
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drop the autocast forward wrapper
    model.eval()
    model.gradient_checkpointing = False
    result.seconds = time.perf_counter() - began
    return result
