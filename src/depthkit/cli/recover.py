"""`depthkit recover`: LoRA recovery fine-tuning of a compressed model (optionally distilled from
the original, on text and, with --self-distill, on its own answers to chat prompts), merged back
into a plain checkpoint in OUT/model.

Runs on whatever `accelerate` is configured for: `depthkit recover ...` on one CPU or GPU,
`accelerate launch -m depthkit.cli.main recover ...` for several GPUs (DDP/FSDP/DeepSpeed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from depthkit.cli.common import (
    DTYPE_HELP,
    add_checkpoint_args,
    add_data_args,
    add_schedule_args,
    data_spec,
    non_negative_int,
    positive_float,
    positive_int,
)
from depthkit.data.blocks import DataSpec, sample_blocks, token_stream
from depthkit.data.corpora import DEFAULT_CALIB
from depthkit.errors import DepthkitError, require
from depthkit.models.loading import load_model, resolve_model_path
from depthkit.recover.trainer import CARD_FILE, RecoverySettings, recover
from depthkit.utils.io import check_output_dir, format_table

DEFAULTS = RecoverySettings()

HELP = "LoRA recovery fine-tuning of a compressed model"


def register(subparsers) -> None:
    parser = subparsers.add_parser("recover", help=HELP)
    parser.add_argument("--model", required=True, help="the compressed model (folder or hub id)")
    parser.add_argument("--dtype", default="auto",
                        help="dtype of the frozen base (adapters are float32): " + DTYPE_HELP)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    add_data_args(parser, "--data", split="calib", default=DEFAULT_CALIB)
    parser.add_argument("--eval-data", default=None,
                        help="corpus for held-out perplexity, its heldout split (default: the --data corpus)")
    parser.add_argument("--eval-tokens", type=positive_int, default=DEFAULTS.eval_tokens,
                        help="held-out tokens scored (in --seq-len windows) every --eval-every steps")
    parser.add_argument("--teacher", default=None, help="the original model, to distil from")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="weight of the KL term, (1 - w) for cross-entropy (default 0.5 with --teacher)")
    parser.add_argument("--temperature", type=positive_float, default=DEFAULTS.temperature,
                        help="softens both distributions in the KL term")
    parser.add_argument("--self-distill", type=int, default=DEFAULTS.self_distill, metavar="N",
                        help="the --teacher answers N chat prompts built from the training text before training "
                             "(summarise/continue/explain a passage; greedy) and the model learns those answers "
                             "(KL on the answer tokens) on every --self-distill-every-th step; 0: off")
    parser.add_argument("--self-distill-every", type=int, default=DEFAULTS.self_distill_every, metavar="K",
                        help="with --self-distill: every K-th step trains on the teacher's answers instead of text")
    parser.add_argument("--self-distill-tokens", type=int, default=DEFAULTS.self_distill_tokens,
                        help="with --self-distill: most tokens per generated answer")
    parser.add_argument("--steps", type=non_negative_int, default=DEFAULTS.steps, help="optimizer steps")
    parser.add_argument("--seq-len", type=positive_int, default=DEFAULTS.seq_len, help="tokens per training sequence")
    add_schedule_args(parser, DEFAULTS)
    parser.add_argument("--lora-rank", type=non_negative_int, default=DEFAULTS.lora_rank,
                        help="rank of the LoRA adapters")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scale numerator (default 2 x rank)")
    parser.add_argument("--eval-every", type=non_negative_int, default=DEFAULTS.eval_every,
                        help="steps between held-out evaluations")
    parser.add_argument("--allow-repeat", action="store_true",
                        help="cycle the training text when the steps need more than it has (else an error)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the adapters' initialisation and "
                        "of the data order")
    parser.add_argument("--out", required=True, help="folder: OUT/model (result) and OUT/checkpoints")
    add_checkpoint_args(parser, DEFAULTS, "OUT/checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> RecoverySettings:
    weight = args.distill_weight if args.distill_weight is not None else (0.5 if args.teacher else 0.0)
    require(args.teacher is not None or weight == 0, "--distill-weight needs --teacher")
    require(args.teacher is not None or args.self_distill == 0,
            "--self-distill needs --teacher: the original model writes the answers to learn")
    return RecoverySettings(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        distill_weight=weight, temperature=args.temperature, eval_every=args.eval_every,
        eval_tokens=args.eval_tokens, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, allow_repeat=args.allow_repeat, seed=args.seed,
        self_distill=args.self_distill, self_distill_every=args.self_distill_every,
        self_distill_tokens=args.self_distill_tokens,
    )


def training_text(tokenizer, spec: DataSpec, settings: RecoverySettings, processes: int) -> torch.Tensor:
    """The blocks the text steps need, sampled over the whole text (every component of a mixture in
    equal shares, every document), as one stream; with --allow-repeat the whole text, cycled."""
    if settings.allow_repeat:
        return token_stream(tokenizer, spec)
    blocks = settings.text_steps() * settings.batch_size * processes
    try:
        return sample_blocks(tokenizer, spec, blocks, settings.seq_len).flatten()
    except DepthkitError as err:
        raise DepthkitError(f"{err}; or pass --allow-repeat to cycle the text, or lower "
                            "--steps/--batch-size/--seq-len") from None


def run(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    settings = settings_from_args(args)
    settings.validate()
    check_output_dir(Path(args.out) / "model", args.overwrite)  # before loading anything
    if args.teacher and not args.teacher.startswith("tiny:"):
        resolve_model_path(args.teacher)  # a missing teacher folder is found before the student loads
    model, tokenizer = load_model(args.model, args.dtype)
    teacher = None
    if args.teacher:
        teacher, _ = load_model(args.teacher, args.dtype)
        require(teacher.config.vocab_size == model.config.vocab_size,
                f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's "
                f"({model.config.vocab_size}): distillation needs the same tokenizer")
    train_spec = data_spec(args)
    eval_spec = DataSpec(args.eval_data or train_spec.corpus, "heldout")
    meta = {"model": args.model, "teacher": args.teacher, "data": train_spec.describe(),
            "eval_data": eval_spec.describe(), "dtype": args.dtype}
    accelerator = Accelerator(cpu=args.cpu)
    card = recover(model, tokenizer, training_text(tokenizer, train_spec, settings, accelerator.num_processes),
                   sample_blocks(tokenizer, eval_spec, -(-settings.eval_tokens // settings.seq_len),
                                 settings.seq_len).flatten(),
                   settings, args.out, teacher=teacher, resume=args.resume, overwrite=args.overwrite,
                   accelerator=accelerator, meta=meta)
    if not accelerator.is_main_process:
        return
    print(format_table([{"model": args.model, "held-out data": eval_spec.describe(), "steps": card["steps"],
                         "tokens": card["tokens_trained"], "perplexity before": card["perplexity_before"],
                         "perplexity after": card["perplexity_after"], "seconds": card["seconds"]}]))
    print(f"recovered model in {Path(args.out) / 'model'} (card: {CARD_FILE})")
