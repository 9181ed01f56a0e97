"""Training a (recursive) VLM in two stages, LLaVA style.

Stage 1 aligns the projector: LLM frozen, one pass (R = 1), cross-entropy on the answer.
Stage 2 trains the recursion: the projector, the Recursive Connector (if any) and a LoRA shared
by every loop, with the recursion loss over steps 1..R (`depthkit.recursive.loss`): the
Monotonic Recursion Loss for RecursiveVLM, the last step only for vanilla recursion.

The loop is the shared training core (`depthkit.training`): warm-up + cosine schedule, clipping,
`accelerate` (one CPU, one GPU or several processes, `accelerate launch`, each process taking its
share of the batches) and resumable checkpoints, one folder per stage (`checkpoint_dir`).
No autocast: the frozen LLM is already in the fast dtype of the device (bf16 where native, else
float32; `depthkit.utils.precision`) and every trainable module is float32.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from depthkit.errors import require
from depthkit.recursive.loss import LOSSES, recursion_loss
from depthkit.training import Trainer, TrainingSettings
from depthkit.vlm.batches import VQABatches
from depthkit.vlm.model import VisionLanguageModel, VLMBatch, answer_targets, embedding_norm


@dataclass
class VLMTrainSettings(TrainingSettings):
    """One stage of VLM training (recorded in the log, compared on resume)."""

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    loss: str = "monotonic"  # monotonic | sum | last (see depthkit.recursive.loss)
    beta: float = 2.0

    def validate(self) -> None:
        super().validate()
        require(self.loss in LOSSES, f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}")


@dataclass
class TrainLog:
    settings: dict
    seconds: float = 0.0
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)


def step_token_losses(vlm: torch.nn.Module, batch: VLMBatch, num_loops: int | None = None) -> list[torch.Tensor]:
    """Per-answer-token cross-entropy (float32) at every step (`vlm` may be accelerate's wrapper)."""
    _, targets = answer_targets(batch.labels)
    return [F.cross_entropy(logits.float(), targets, reduction="none") for logits in vlm(batch, num_loops)]


def train(vlm: VisionLanguageModel, batches: VQABatches, settings: VLMTrainSettings, progress: bool = True,
          desc: str = "train", accelerator: Accelerator | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool = False, context: dict[str, Any] | None = None) -> TrainLog:
    """AdamW on the VLM's trainable parameters with linear warm-up and cosine decay.

    `checkpoint_dir`, `resume` and `context` (what else defines the run) are the training core's.
    """
    settings.validate()
    params = vlm.trainable_parameters()
    require(params, "nothing to train: every parameter is frozen")
    accelerator = accelerator or Accelerator()
    trainer = Trainer(settings, accelerator, checkpoint_dir, resume, context=context)
    (prepared,) = trainer.prepare(vlm, params)
    prepared.train()

    def loss(batch: VLMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        losses = step_token_losses(prepared, batch.to(accelerator.device))
        value = recursion_loss(losses, torch.ones_like(losses[0], dtype=torch.bool), settings.loss, settings.beta)
        means = [float(x.detach().mean()) for x in losses]
        return value, {"loss": float(value.detach()), "last": means[-1], "step_losses": means}

    def batches_from(start: int):
        return itertools.islice(process_share(batches, settings, accelerator), start, None)

    state = trainer.run(batches_from, loss, desc=desc, show=progress)
    vlm.eval()
    return TrainLog(asdict(settings), state.seconds, sum(p.numel() for p in params),
                    [record["loss"] for record in state.history], [record["step_losses"] for record in state.history])


def process_share(batches: VQABatches, settings: VLMTrainSettings, accelerator: Accelerator):
    """This process's `settings.steps` batches: every process draws the same seeded sequence of
    steps x processes batches and takes every n-th one, so n processes see n different batches."""
    world, rank = accelerator.num_processes, accelerator.process_index
    drawn = batches.shuffled(settings.batch_size, settings.steps * world, settings.seed)
    return itertools.islice(drawn, rank, None, world)


def init_projector(vlm: VisionLanguageModel, batches: VQABatches, sample: int = 64) -> None:
    """Start the projector's output at the LLM's embedding norm (see `Projector.match_norm`)."""
    features = torch.stack([batches.features[e.image] for e in batches.examples[:sample]])
    vlm.projector.match_norm(features.float(), embedding_norm(vlm.language_model))


def train_stage1(vlm: VisionLanguageModel, batches: VQABatches, settings: VLMTrainSettings,
                 progress: bool = True, checkpointing: dict[str, Any] | None = None) -> TrainLog:
    """Projector alignment: the LLM (and any recursion) frozen, one pass. `checkpointing`:
    `checkpoint_dir`, `resume` and `context`, as `train` takes them."""
    vlm.make_recursive(num_loops=1, feedback="vanilla")
    vlm.language_model.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    init_projector(vlm, batches)
    return train(vlm, batches, settings, progress, desc="stage 1 (projector)", **(checkpointing or {}))


def train_stage2(vlm: VisionLanguageModel, batches: VQABatches, settings: VLMTrainSettings, num_loops: int = 3,
                 feedback: str = "connector", modality_specific: bool = True, lora_rank: int = 8,
                 progress: bool = True, desc: str = "stage 2", lora_init: dict[str, torch.Tensor] | None = None,
                 checkpointing: dict[str, Any] | None = None, **options) -> TrainLog:
    """The recursion: projector + connector (if any) + a LoRA shared by all loops; the LLM stays frozen.

    `lora_init` (a `recursive.adapters` state dict) starts the LoRA from given weights: comparisons
    need it, because building a connector draws random numbers before the LoRA is built, so one
    seed alone gives variants with and without a connector different LoRA starts. `checkpointing`:
    `checkpoint_dir`, `resume` and `context`, as `train` takes them (`options` go to `make_recursive`).
    """
    recursive = vlm.make_recursive(num_loops, feedback, modality_specific, lora_rank=lora_rank, **options)
    if lora_init is not None:
        recursive.adapters.load_state_dict(lora_init)
    vlm.language_model.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    return train(vlm, batches, settings, progress, desc=desc, **(checkpointing or {}))
