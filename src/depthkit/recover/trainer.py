"""Recovery fine-tuning of a compressed model: LoRA on every block, driven by `accelerate`.

The loop is plain PyTorch wrapped by `Accelerator`, so the same code runs on one CPU, one GPU or
several GPUs (DDP, FSDP, DeepSpeed) depending on how it is started (`accelerate launch` and its
config); depthkit contains no distributed code of its own. `batch_size` is per process.

Data: the training text (the `calib` split) is cut into `seq_len`-token blocks, shuffled once
with the seed. A run needs `steps x batch_size x processes` blocks. Reusing text silently would
make a "200-step" run mean something different on a small corpus, so too little text is an
error unless `allow_repeat` is set, in which case the blocks are cycled for as many epochs as
the steps need (the card records the epoch count).

Self-distillation (`self_distill` > 0, needs `teacher`): the teacher answers that many chat prompts
built from the training blocks before training, and every `self_distill_every`-th step trains on
those answers instead of text (`self_distill.py`), so the text steps need a 1/k share fewer blocks.

The loop, schedule and checkpoints are the shared training core (`depthkit.training`).
Outputs in `out/`: `checkpoints/` while training (resumable; removed once `model/` is written)
and `model/`, the merged plain Hugging Face checkpoint with its tokenizer and `recovery_card.json`
(held-out perplexity before/after, settings, loss curve), written atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from depthkit.errors import DepthkitError, require
from depthkit.evaluate.perplexity import perplexity
from depthkit.recover.lora import attach_lora, save_merged, trainable_parameters
from depthkit.recover.losses import recovery_loss
from depthkit.recover.self_distill import SET_FILE, answer_kl, interleaved, self_distill_set
from depthkit.training import Progress, Trainer, TrainingSettings, cycled, due, remove_checkpoints
from depthkit.utils.io import atomic_output_dir, check_output_dir, write_json

CARD_FILE = "recovery_card.json"


@dataclass
class RecoverySettings(TrainingSettings):
    """Everything that defines a recovery run (saved with checkpoints, compared on resume)."""

    steps: int = 200
    lr: float = 5e-4  # short budgets: benchmarks/recovery.py measures 200 steps at this rate
    batch_size: int = 1
    seq_len: int = 512
    lora_rank: int = 8
    lora_alpha: float | None = None  # default 2 x rank
    lora_dropout: float = 0.0
    distill_weight: float = 0.0
    temperature: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 8192
    allow_repeat: bool = False
    self_distill: int = 0  # chat examples the teacher answers from the training text (0: off)
    self_distill_every: int = 4  # with self_distill: every k-th step is a batch of them (a 1/k share)
    self_distill_tokens: int = 64  # most answer tokens the teacher generates per example

    def validate(self) -> None:
        super().validate()
        require(self.steps >= 1, f"`steps` must be >= 1, got {self.steps}")
        require(self.seq_len >= 2, f"`seq_len` must be >= 2, got {self.seq_len}")
        require(self.lora_rank >= 1, f"`lora_rank` must be >= 1, got {self.lora_rank}")
        require(0 <= self.distill_weight <= 1, f"`distill_weight` must be in [0, 1], got {self.distill_weight}")
        require(self.temperature > 0, f"`temperature` must be > 0, got {self.temperature}")
        require(self.eval_tokens >= self.seq_len,
                f"`eval_tokens` ({self.eval_tokens}) must cover at least one window of `seq_len` ({self.seq_len})")
        require(self.eval_every >= 1, "`eval_every` must be >= 1")
        require(self.self_distill >= 0, f"`self_distill` must be >= 0 (0: off), got {self.self_distill}")
        require(self.self_distill_every >= 2,
                f"`self_distill_every` must be >= 2 (some steps must be text), got {self.self_distill_every}")
        require(self.self_distill_tokens >= 1, f"`self_distill_tokens` must be >= 1, got {self.self_distill_tokens}")
        self.check_self_distill_batches(1)

    def check_self_distill_batches(self, processes: int) -> None:
        """A self-distillation step needs a full batch of examples on every process."""
        per_step = self.batch_size * processes
        require(self.self_distill == 0 or self.self_distill >= per_step,
                f"`self_distill` ({self.self_distill}) must be at least one step's {per_step} sequences "
                "(`batch_size` x processes)")

    def text_steps(self, steps: int | None = None) -> int:
        """How many of the first `steps` (default: all) optimizer steps train on text."""
        steps = self.steps if steps is None else steps
        return steps - steps // self.self_distill_every if self.self_distill else steps


@dataclass
class RecoveryProgress(Progress):
    """The shared progress plus the held-out perplexity before training."""

    before: float | None = None


def training_blocks(stream: torch.Tensor, settings: RecoverySettings, processes: int = 1,
                    source: str = "the training text") -> torch.Tensor:
    """Shuffled `seq_len` blocks of `stream`: exactly the ones the text steps need, or all of them
    (cycled) with `allow_repeat`. Too little text is a `DepthkitError` saying what to change."""
    available = stream.numel() // settings.seq_len
    per_step = settings.batch_size * processes
    needed = settings.text_steps() * per_step
    if available < per_step:
        raise DepthkitError(f"{source} has {stream.numel()} tokens: not even one batch of "
                            f"{per_step} x {settings.seq_len} tokens")
    if available < needed and not settings.allow_repeat:
        raise DepthkitError(
            f"{source} is too small: {settings.text_steps()} steps on text x {per_step} sequences x "
            f"{settings.seq_len} tokens "
            f"need {needed * settings.seq_len} tokens, it has {available * settings.seq_len}; pass `allow_repeat` "
            f"to cycle it ({needed / available:.1f} epochs), or lower `steps`/`batch_size`/`seq_len`")
    blocks = stream[: available * settings.seq_len].view(available, settings.seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(settings.seed))
    return blocks[order[: needed if available >= needed else available]]


def evaluate(model: torch.nn.Module, stream: torch.Tensor, settings: RecoverySettings) -> float:
    """Held-out perplexity on the first `eval_tokens` tokens, in `seq_len` windows."""
    was_training = model.training
    model.eval()
    result = perplexity(model, stream, window=settings.seq_len, max_tokens=settings.eval_tokens,
                        batch_size=settings.batch_size, progress=False)
    model.train(was_training)
    return result.perplexity


def recover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_stream: torch.Tensor,
    eval_stream: torch.Tensor,
    settings: RecoverySettings,
    out: str | Path,
    teacher: PreTrainedModel | None = None,
    resume: bool = False,
    overwrite: bool = False,
    accelerator: Accelerator | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on `train_stream`, merge them, save `out/model`; return the card.

    `model` gets the adapters (the merged weights go into the saved checkpoint, not into `model`);
    `teacher`, when given, is only run forward (and generates, for `self_distill`). `meta` (model
    name, data descriptions, ...) is copied into the card and must match on resume.
    """
    settings.validate()
    require(teacher is not None or settings.distill_weight == 0, "`distill_weight` needs `teacher`")
    require(teacher is not None or settings.self_distill == 0, "`self_distill` needs `teacher`")
    out = Path(out)
    final_dir = check_output_dir(out / "model", overwrite)
    ckpt_root = out / "checkpoints"
    accelerator = accelerator or Accelerator()
    state = RecoveryProgress()
    trainer = Trainer(settings, accelerator, ckpt_root, resume, state, meta)
    set_seed(settings.seed)
    blocks = training_blocks(train_stream, settings, accelerator.num_processes, (meta or {}).get("data", "the text"))
    chat = None
    if settings.self_distill:
        settings.check_self_distill_batches(accelerator.num_processes)
        chat = self_distill_set(teacher, tokenizer, blocks, settings.self_distill, settings.self_distill_tokens,
                                settings.seed, ckpt_root / SET_FILE, resume, accelerator, progress)

    model = attach_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout)
    model.train()
    loaders = [DataLoader(TensorDataset(blocks), batch_size=settings.batch_size, shuffle=False, drop_last=True)]
    loaders += [chat.loader(settings.batch_size)] if chat is not None else []
    model, *loaders = trainer.prepare(model, [p for p in model.parameters() if p.requires_grad], *loaders)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
    if state.before is None:
        state.before = evaluate(model, eval_stream, settings)

    def loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        parts = _loss_parts(model, teacher, batch, settings)
        return parts["loss"], {name: accelerator.reduce(value.detach(), "mean").item() for name, value in parts.items()}

    def after_step(step: int) -> None:
        if due(step, settings.eval_every, settings.steps):
            state.evals.append({"step": step, "perplexity": evaluate(model, eval_stream, settings)})
            accelerator.print(f"step {step}: held-out perplexity {state.evals[-1]['perplexity']:.3f}")

    def batches(start: int) -> Iterator[list[torch.Tensor]]:
        if chat is None:
            return cycled(loaders[0], start)
        return interleaved(loaders[0], loaders[1], settings.self_distill_every, start)

    trainer.run(batches, loss, after_step, desc="recover", show=progress)
    if not state.evals or state.evals[-1]["step"] != state.step:
        state.evals.append({"step": state.step, "perplexity": evaluate(model, eval_stream, settings)})

    epoch_blocks = len(loaders[0]) * settings.batch_size * accelerator.num_processes
    card = _card(state, settings, accelerator, epoch_blocks, trainable_parameters(model), meta)
    if chat is not None:
        card["self_distill"] = chat.summary(settings.self_distill_every)
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model)  # every process takes part: gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        with atomic_output_dir(final_dir, overwrite) as tmp:
            save_merged(accelerator.unwrap_model(model), tmp, full_state)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / CARD_FILE, card)
    remove_checkpoints(ckpt_root)
    accelerator.free_memory()
    return card


def _loss_parts(model, teacher, batch: list[torch.Tensor], settings: RecoverySettings) -> dict[str, torch.Tensor]:
    """The recovery loss of one batch and its parts: cross-entropy and distillation on a text batch
    ([ids]), the answers' KL to the teacher on a self-distillation batch ([ids, targets])."""
    ids = batch[0]
    logits = model(input_ids=ids, use_cache=False).logits
    if len(batch) == 2:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        kl = answer_kl(logits, teacher_logits, batch[1], settings.temperature)
        return {"loss": kl, "self_distill_kl": kl}
    teacher_logits = None
    if teacher is not None and settings.distill_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    return recovery_loss(logits, ids, teacher_logits, settings.distill_weight, settings.temperature)


def _card(state: RecoveryProgress, settings: RecoverySettings, accelerator: Accelerator, epoch_blocks: int,
          trainable: int, meta: dict[str, Any] | None) -> dict[str, Any]:
    tokens_per_step = settings.batch_size * settings.seq_len * accelerator.num_processes
    text_steps = settings.text_steps(state.step)
    after = state.evals[-1]["perplexity"]
    return {
        **(meta or {}),
        "perplexity_before": state.before,
        "perplexity_after": after,
        "steps": state.step,
        "tokens_trained": text_steps * tokens_per_step,  # of the training text
        "epochs": text_steps * settings.batch_size * accelerator.num_processes / epoch_blocks,
        "trainable_parameters": trainable,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "seconds": state.seconds,
        "settings": asdict(settings),
        "evals": state.evals,
        "losses": state.history,
    }
