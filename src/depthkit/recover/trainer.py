"""Recovery fine-tuning of a compressed model: LoRA on every block, driven by `accelerate`.

The loop is plain PyTorch wrapped by `Accelerator`, so the same code runs on one CPU, one GPU or
several GPUs (DDP, FSDP, DeepSpeed) depending on how it is started (`accelerate launch` and its
config); depthkit contains no distributed code of its own. `batch_size` is per process.

Data: the training text (the `calib` split) is cut into `seq_len`-token blocks, shuffled once
with the seed. A run needs `steps x batch_size x processes` blocks. Reusing text silently would
make a "200-step" run mean something different on a small corpus, so too little text is an
error unless `allow_repeat` is set, in which case the blocks are cycled for as many epochs as
the steps need (the card records the epoch count).

The loop, schedule and checkpoints are the shared training core (`depthkit.training`).
Outputs in `out/`: `checkpoints/` while training (resumable; removed once `model/` is written)
and `model/`, the merged plain Hugging Face checkpoint with its tokenizer and `recovery_card.json`
(held-out perplexity before/after, settings, loss curve), written atomically.
"""

from __future__ import annotations

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


@dataclass
class RecoveryProgress(Progress):
    """The shared progress plus the held-out perplexity before training."""

    before: float | None = None


def training_blocks(stream: torch.Tensor, settings: RecoverySettings, processes: int = 1,
                    source: str = "the training text") -> torch.Tensor:
    """Shuffled `seq_len` blocks of `stream`: exactly the ones the steps need, or all of them
    (cycled) with `allow_repeat`. Too little text is a `DepthkitError` saying what to change."""
    available = stream.numel() // settings.seq_len
    per_step = settings.batch_size * processes
    needed = settings.steps * per_step
    if available < per_step:
        raise DepthkitError(f"{source} has {stream.numel()} tokens: not even one batch of "
                            f"{per_step} x {settings.seq_len} tokens")
    if available < needed and not settings.allow_repeat:
        raise DepthkitError(
            f"{source} is too small: {settings.steps} steps x {per_step} sequences x {settings.seq_len} tokens "
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
    `teacher`, when given, is only run forward. `meta` (model name, data descriptions, ...) is
    copied into the card and must match on resume.
    """
    settings.validate()
    require(teacher is not None or settings.distill_weight == 0, "`distill_weight` needs `teacher`")
    out = Path(out)
    final_dir = check_output_dir(out / "model", overwrite)
    ckpt_root = out / "checkpoints"
    accelerator = accelerator or Accelerator()
    state = RecoveryProgress()
    trainer = Trainer(settings, accelerator, ckpt_root, resume, state, meta)
    set_seed(settings.seed)
    blocks = training_blocks(train_stream, settings, accelerator.num_processes, (meta or {}).get("data", "the text"))

    model = attach_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout)
    model.train()
    loader = DataLoader(TensorDataset(blocks), batch_size=settings.batch_size, shuffle=False, drop_last=True)
    model, loader = trainer.prepare(model, [p for p in model.parameters() if p.requires_grad], loader)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
    if state.before is None:
        state.before = evaluate(model, eval_stream, settings)

    def loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        parts = _loss_parts(model, teacher, batch[0], settings)
        return parts["loss"], {name: accelerator.reduce(value.detach(), "mean").item() for name, value in parts.items()}

    def after_step(step: int) -> None:
        if due(step, settings.eval_every, settings.steps):
            state.evals.append({"step": step, "perplexity": evaluate(model, eval_stream, settings)})
            accelerator.print(f"step {step}: held-out perplexity {state.evals[-1]['perplexity']:.3f}")

    trainer.run(lambda start: cycled(loader, start), loss, after_step, desc="recover", show=progress)
    if not state.evals or state.evals[-1]["step"] != state.step:
        state.evals.append({"step": state.step, "perplexity": evaluate(model, eval_stream, settings)})

    epoch_blocks = len(loader) * settings.batch_size * accelerator.num_processes
    card = _card(state, settings, accelerator, epoch_blocks, trainable_parameters(model), meta)
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


def _loss_parts(model, teacher, ids: torch.Tensor, settings: RecoverySettings) -> dict[str, torch.Tensor]:
    """The recovery loss of one batch and its parts (cross-entropy, distillation)."""
    logits = model(input_ids=ids, use_cache=False).logits
    teacher_logits = None
    if teacher is not None and settings.distill_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    return recovery_loss(logits, ids, teacher_logits, settings.distill_weight, settings.temperature)


def _card(state: RecoveryProgress, settings: RecoverySettings, accelerator: Accelerator, epoch_blocks: int,
          trainable: int, meta: dict[str, Any] | None) -> dict[str, Any]:
    tokens_per_step = settings.batch_size * settings.seq_len * accelerator.num_processes
    after = state.evals[-1]["perplexity"]
    return {
        **(meta or {}),
        "perplexity_before": state.before,
        "perplexity_after": after,
        "steps": state.step,
        "tokens_trained": state.step * tokens_per_step,
        "epochs": state.step * settings.batch_size * accelerator.num_processes / epoch_blocks,
        "trainable_parameters": trainable,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "seconds": state.seconds,
        "settings": asdict(settings),
        "evals": state.evals,
        "losses": state.history,
    }
