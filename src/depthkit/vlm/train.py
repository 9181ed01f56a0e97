"""Training a (recursive) VLM in two stages, LLaVA style.

Stage 1 aligns the projector: LLM frozen, one pass (R = 1), cross-entropy on the answer.
Stage 2 trains the recursion: the projector, the Recursive Connector (if any) and a LoRA shared
by every loop, with the recursion loss over steps 1..R (`depthkit.recursive.loss`): the
Monotonic Recursion Loss for RecursiveVLM, the last step only for vanilla recursion.

The loop is plain PyTorch driven by `accelerate`, like `depthkit.recursive.train`: one CPU, one
GPU or several processes (`accelerate launch`), each process taking its share of the batches.
No autocast: the frozen LLM is already in the fast dtype of the device (bf16 where native, else
float32; `depthkit.utils.precision`) and every trainable module is float32.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from depthkit.errors import require
from depthkit.recursive.loss import recursion_loss
from depthkit.recursive.train import check_checkpointing, save_periodic
from depthkit.vlm.batches import VQABatches
from depthkit.vlm.model import VisionLanguageModel, VLMBatch, answer_targets, embedding_norm


@dataclass
class TrainSettings:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10
    loss: str = "monotonic"  # monotonic | sum | last (see depthkit.recursive.loss)
    beta: float = 2.0
    seed: int = 0
    checkpoint_every: int = 0  # save every N optimizer steps and at the end (0 = never)
    checkpoint_dir: str | None = None  # checkpoints go to <checkpoint_dir>/step-<N> (`load_vlm` reloads them)

    def validate(self) -> None:
        check_checkpointing(self.checkpoint_every, self.checkpoint_dir)


@dataclass
class TrainLog:
    settings: dict
    seconds: float = 0.0
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def step_token_losses(vlm: torch.nn.Module, batch: VLMBatch, num_loops: int | None = None) -> list[torch.Tensor]:
    """Per-answer-token cross-entropy (float32) at every step (`vlm` may be accelerate's wrapper)."""
    _, targets = answer_targets(batch.labels)
    return [F.cross_entropy(logits.float(), targets, reduction="none") for logits in vlm(batch, num_loops)]


def train(vlm: VisionLanguageModel, batches: VQABatches, settings: TrainSettings, progress: bool = True,
          desc: str = "train", accelerator: Accelerator | None = None) -> TrainLog:
    """AdamW on the VLM's trainable parameters with linear warm-up and cosine decay."""
    settings.validate()
    params = vlm.trainable_parameters()
    require(params, "nothing to train: every parameter is frozen")
    accelerator = accelerator or Accelerator()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    prepared, optimizer, schedule = accelerator.prepare(vlm, optimizer, schedule)
    log = TrainLog(asdict(settings), trainable_parameters=sum(p.numel() for p in params))
    prepared.train()
    start = time.perf_counter()
    bar = tqdm(process_share(batches, settings, accelerator), total=settings.steps, desc=desc,
               disable=not progress or not accelerator.is_main_process)
    for step, batch in enumerate(bar, start=1):
        losses = step_token_losses(prepared, batch.to(accelerator.device))
        loss = recursion_loss(losses, torch.ones_like(losses[0], dtype=torch.bool), settings.loss, settings.beta)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        log.losses.append(float(loss.detach()))
        log.step_losses.append([float(x.detach().mean()) for x in losses])
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", last=f"{log.step_losses[-1][-1]:.3f}")
        folder = save_periodic(partial(vlm.save, overwrite=True), step, settings.steps, settings.checkpoint_every,
                               settings.checkpoint_dir, accelerator)
        if folder:
            log.checkpoints.append(folder)
    vlm.eval()
    log.seconds = time.perf_counter() - start
    return log


def process_share(batches: VQABatches, settings: TrainSettings, accelerator: Accelerator):
    """This process's `settings.steps` batches: every process draws the same seeded sequence of
    steps x processes batches and takes every n-th one, so n processes see n different batches."""
    world, rank = accelerator.num_processes, accelerator.process_index
    drawn = batches.shuffled(settings.batch_size, settings.steps * world, settings.seed)
    return itertools.islice(drawn, rank, None, world)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def init_projector(vlm: VisionLanguageModel, batches: VQABatches, sample: int = 64) -> None:
    """Start the projector's output at the LLM's embedding norm (see `Projector.match_norm`)."""
    features = torch.stack([batches.features[e.image] for e in batches.examples[:sample]])
    vlm.projector.match_norm(features.float(), embedding_norm(vlm.language_model))


def train_stage1(vlm: VisionLanguageModel, batches: VQABatches, settings: TrainSettings,
                 progress: bool = True) -> TrainLog:
    """Projector alignment: the LLM (and any recursion) frozen, one pass."""
    vlm.make_recursive(num_loops=1, feedback="vanilla")
    vlm.language_model.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    init_projector(vlm, batches)
    return train(vlm, batches, settings, progress, desc="stage 1 (projector)")


def train_stage2(vlm: VisionLanguageModel, batches: VQABatches, settings: TrainSettings, num_loops: int = 3,
                 feedback: str = "connector", modality_specific: bool = True, lora_rank: int = 8,
                 progress: bool = True, desc: str = "stage 2", lora_init: dict[str, torch.Tensor] | None = None,
                 **options) -> TrainLog:
    """The recursion: projector + connector (if any) + a LoRA shared by all loops; the LLM stays frozen.

    `lora_init` (a `recursive.adapters` state dict) starts the LoRA from given weights: comparisons
    need it, because building a connector draws random numbers before the LoRA is built, so one
    seed alone gives variants with and without a connector different LoRA starts.
    """
    recursive = vlm.make_recursive(num_loops, feedback, modality_specific, lora_rank=lora_rank, **options)
    if lora_init is not None:
        recursive.adapters.load_state_dict(lora_init)
    vlm.language_model.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    return train(vlm, batches, settings, progress, desc=desc)
