"""Recovery fine-tuning of a compressed model: LoRA on every block, driven by `accelerate`.

The loop is plain PyTorch wrapped by `Accelerator`, so the same code runs on one CPU, one GPU or
several GPUs (DDP, FSDP, DeepSpeed) depending on how it is started (`accelerate launch` and its
config); depthkit contains no distributed code of its own. `batch_size` is per process.

Data: the training text (the `calib` split) is cut into `seq_len`-token blocks, shuffled once
with the seed. A run needs `steps x batch_size x processes` blocks. Reusing text silently would
make a "200-step" run mean something different on a small corpus, so too little text is an
error unless `allow_repeat` is set, in which case the blocks are cycled for as many epochs as
the steps need (the card records the epoch count).

Outputs in `out/`: `checkpoints/` while training (see `checkpoints.py`; removed at the end unless
kept) and `model/`, the merged plain Hugging Face checkpoint with its tokenizer and
`recovery_card.json` (held-out perplexity before/after, settings, loss curve), written atomically.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import depthkit.recover.checkpoints as checkpoints
from depthkit.errors import DepthkitError, require
from depthkit.evaluate.perplexity import perplexity
from depthkit.recover.lora import attach_lora, save_merged, trainable_parameters
from depthkit.recover.losses import recovery_loss
from depthkit.utils.io import atomic_output_dir, check_output_dir, write_json

CARD_FILE = "recovery_card.json"


@dataclass
class RecoverySettings:
    """Everything that defines a recovery run (saved with checkpoints, compared on resume)."""

    steps: int = 200
    seq_len: int = 512
    batch_size: int = 1
    lr: float = 5e-4  # short budgets: benchmarks/recovery.py measures 200 steps at this rate
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float | None = None  # default 2 x rank
    lora_dropout: float = 0.0
    distill_weight: float = 0.0
    temperature: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 8192
    save_every: int = 50
    allow_repeat: bool = False
    seed: int = 0

    def validate(self) -> None:
        require(self.steps >= 1, f"`steps` must be >= 1, got {self.steps}")
        require(self.seq_len >= 2, f"`seq_len` must be >= 2, got {self.seq_len}")
        require(self.batch_size >= 1, f"`batch_size` must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"`lr` must be > 0, got {self.lr}")
        require(self.lora_rank >= 1, f"`lora_rank` must be >= 1, got {self.lora_rank}")
        require(0 <= self.distill_weight <= 1, f"`distill_weight` must be in [0, 1], got {self.distill_weight}")
        require(self.temperature > 0, f"`temperature` must be > 0, got {self.temperature}")
        require(self.eval_tokens >= self.seq_len,
                f"`eval_tokens` ({self.eval_tokens}) must cover at least one window of `seq_len` ({self.seq_len})")
        require(self.eval_every >= 1 and self.save_every >= 1, "`eval_every` and `save_every` must be >= 1")


@dataclass
class Progress:
    """Training state beyond model/optimizer: registered with accelerate so it is checkpointed."""

    step: int = 0
    before: float | None = None
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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


def lr_lambda(settings: RecoverySettings, processes: int):
    """Linear warm-up then cosine decay to zero. A prepared scheduler is stepped once per process
    per optimizer step (accelerate's convention), hence the scaling by `processes`."""
    total, warmup = settings.steps * processes, settings.warmup_steps * processes

    def factor(count: int) -> float:
        if count < warmup:
            return (count + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (count - warmup) / max(1, total - warmup))))

    return factor


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
    keep_checkpoints: bool = False,
    accelerator: Accelerator | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on `train_stream`, merge them, save `out/model`; return the card.

    `model` gets the adapters (the merged weights go into the saved checkpoint, not into `model`);
    `teacher`, when given, is only run forward. `meta` (model name, data descriptions, ...) is
    copied into the card.
    """
    settings.validate()
    require(teacher is not None or settings.distill_weight == 0, "`distill_weight` needs `teacher`")
    out = Path(out)
    final_dir = check_output_dir(out / "model", overwrite)
    ckpt_root = out / "checkpoints"
    accelerator = accelerator or Accelerator()
    _check_resume(accelerator, ckpt_root, resume, settings)
    set_seed(settings.seed)
    blocks = training_blocks(train_stream, settings, accelerator.num_processes, (meta or {}).get("data", "the text"))

    model = attach_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, accelerator.num_processes))
    loader = DataLoader(TensorDataset(blocks), batch_size=settings.batch_size, shuffle=False, drop_last=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
    state = Progress()
    accelerator.register_for_checkpointing(state)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    accelerator.register_save_state_pre_hook(checkpoints.keep_trainable_only([trainable]))

    latest = checkpoints.latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest), strict=False)
        accelerator.print(f"resuming from {latest} (step {state.step} of {settings.steps})")
    elif accelerator.is_main_process:
        checkpoints.write_settings(ckpt_root, asdict(settings))
    if state.before is None:
        state.before = evaluate(model, eval_stream, settings)

    _train(accelerator, model, teacher, optimizer, scheduler, loader, eval_stream, settings, state,
           ckpt_root, progress)
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
        if not keep_checkpoints:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return card


def _check_resume(accelerator: Accelerator, ckpt_root: Path, resume: bool, settings: RecoverySettings) -> None:
    if accelerator.is_main_process:
        checkpoints.remove_partial(ckpt_root)
    accelerator.wait_for_everyone()
    if resume:
        checkpoints.check_settings(ckpt_root, asdict(settings))
    elif checkpoints.latest_checkpoint(ckpt_root) is not None:
        raise DepthkitError(f"{ckpt_root} holds checkpoints of an earlier run: pass `resume` to continue it, "
                            "or remove the folder to start over")


def _train(accelerator, model, teacher, optimizer, scheduler, loader, eval_stream, settings, state,
           ckpt_root, progress) -> None:
    """The optimisation loop from `state.step` to `settings.steps` (cycling the data if allowed)."""
    bar = tqdm(total=settings.steps, initial=state.step, desc="recover", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    began = time.perf_counter() - state.seconds
    per_epoch = len(loader)
    while state.step < settings.steps:
        skip = state.step % per_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for (ids,) in batches:
            parts = _step(accelerator, model, teacher, optimizer, scheduler, ids, settings)
            state.step += 1
            state.losses.append({"step": state.step, "lr": scheduler.get_last_lr()[0], **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
            if state.step % settings.eval_every == 0 or state.step == settings.steps:
                state.evals.append({"step": state.step, "perplexity": evaluate(model, eval_stream, settings)})
                accelerator.print(f"step {state.step}: held-out perplexity {state.evals[-1]['perplexity']:.3f}")
            state.seconds = time.perf_counter() - began
            if state.step % settings.save_every == 0 and state.step < settings.steps:
                checkpoints.save_checkpoint(accelerator, ckpt_root, state.step)
            if state.step >= settings.steps:
                break
    bar.close()


def _step(accelerator, model, teacher, optimizer, scheduler, ids, settings) -> dict[str, float]:
    """One optimizer step; returns the loss and its parts (averaged over processes)."""
    logits = model(input_ids=ids, use_cache=False).logits
    teacher_logits = None
    if teacher is not None and settings.distill_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    parts = recovery_loss(logits, ids, teacher_logits, settings.distill_weight, settings.temperature)
    accelerator.backward(parts["loss"])
    if settings.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {name: accelerator.reduce(value.detach(), "mean").item() for name, value in parts.items()}


def _card(state: Progress, settings: RecoverySettings, accelerator: Accelerator, epoch_blocks: int,
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
        "losses": state.losses,
    }
