"""`depthkit vlm`: train a (recursive) LLaVA-style VLM on the offline VQA set, or ask it a question."""

from __future__ import annotations

import argparse
from pathlib import Path

from depthkit.cli.common import (
    add_checkpoint_args,
    add_model_args,
    add_schedule_args,
    float_at_least,
    loop_count,
    non_negative_int,
    positive_int,
    run_context,
)
from depthkit.recursive.loss import LOSSES
from depthkit.training import check_new_run, checkpoints_beside, remove_checkpoints
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json
from depthkit.vlm.train import VLMTrainSettings

HELP = "recursive vision-language model: train, ask"
DEFAULTS = VLMTrainSettings()


def register(subparsers) -> None:
    parser = subparsers.add_parser("vlm", help=HELP)
    commands = parser.add_subparsers(dest="vlm_command", required=True, metavar="ACTION")
    _register_train(commands)
    _register_ask(commands)


def _register_train(commands) -> None:
    parser = commands.add_parser("train", help="stage 1 (projector) then stage 2 (recursion) on the offline VQA set")
    add_model_args(parser)
    parser.add_argument("--num-layers", type=positive_int, default=None,
                        help="keep the LLM's first N layers (cheaper; default: all)")
    parser.add_argument("--loops", type=loop_count, default=3, help="recursion steps R trained in stage 2")
    parser.add_argument("--feedback", choices=("connector", "vanilla"), default="connector",
                        help="what the next step reads: the Recursive Connector's new input or the last hidden state")
    parser.add_argument("--shared-connector", action="store_true", help="one connector for text and vision tokens")
    parser.add_argument("--loss", choices=LOSSES, default=DEFAULTS.loss,
                        help="stage-2 recursion loss over steps 1..R (stage 1 uses sum at R = 1)")
    parser.add_argument("--beta", type=float_at_least(1.0), default=DEFAULTS.beta,
                        help="monotonic loss penalty on a loss increase")
    parser.add_argument("--lora-rank", type=non_negative_int, default=8, help="LoRA shared by every loop (0: none)")
    parser.add_argument("--stage1-steps", type=non_negative_int, default=150,
                        help="stage-1 (projector alignment) steps (0: skip stage 1)")
    parser.add_argument("--steps", type=positive_int, default=150, help="stage-2 steps")
    add_schedule_args(parser, DEFAULTS, unit="examples", per_stage=" of each stage")
    parser.add_argument("--num-mnist", type=positive_int, default=1200, help="MNIST digits in the dataset")
    parser.add_argument("--num-digits", type=positive_int, default=300, help="scikit-learn 8x8 digits in the dataset")
    parser.add_argument("--num-pairs", type=positive_int, default=600,
                        help="two-digit comparison questions, drawn from the MNIST digits")
    parser.add_argument("--photo-variants", type=positive_int, default=6,
                        help="random crops and flips of each bundled photo")
    parser.add_argument("--eval-examples", type=positive_int, default=None,
                        help="held-out examples scored (default: all)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of the dataset and of the batch order (stage 2 uses seed + 1)")
    parser.add_argument("--out", default="runs/vlm", help="checkpoint folder (projector, connector, LoRA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder depthkit wrote")
    add_checkpoint_args(parser, DEFAULTS, "OUT.checkpoints/")
    parser.set_defaults(func=run_train)


def _register_ask(commands) -> None:
    parser = commands.add_parser("ask", help="answer a question about an image at any recursion depth")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--loops", type=loop_count, default=None, help="recursion steps (default: as trained)")
    parser.add_argument("--checkpoint", default=None,
                        help="folder written by `depthkit vlm train` (default: an untrained projector)")
    add_model_args(parser)
    parser.add_argument("--num-layers", type=positive_int, default=None,
                        help="without --checkpoint: LLM layers kept (default: all)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="greedy answer tokens at most")
    parser.set_defaults(func=run_ask)


def run_train(args: argparse.Namespace) -> None:
    from depthkit.vlm.batches import VQABatches
    from depthkit.vlm.data import VQAConfig, build_vqa, dataset_features
    from depthkit.vlm.evaluate import evaluate_steps
    from depthkit.vlm.model import build_vlm
    from depthkit.vlm.train import train_stage1, train_stage2

    check_output_dir(args.out, args.overwrite)
    checkpoint_dir = checkpoints_beside(args.out)
    check_new_run(checkpoint_dir, args.resume)  # before any work
    # the model first: a bad --model or --num-layers fails before the images are encoded (minutes on a CPU)
    vlm = build_vlm(args.model, args.num_layers, args.dtype, args.device, with_encoder=False)
    dataset = build_vqa(VQAConfig(args.seed, args.num_mnist, args.num_digits, args.num_pairs, args.photo_variants))
    features = dataset_features(dataset)
    train_set = VQABatches(vlm, dataset, "train", features)
    heldout = VQABatches(vlm, dataset, "heldout", features, limit=args.eval_examples)
    shared = {"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
              "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints}
    context = run_context(args)

    def checkpointing(stage: str) -> dict:
        return {"checkpoint_dir": checkpoint_dir / stage, "resume": args.resume, "context": context}

    logs = {}
    if args.stage1_steps:
        settings = VLMTrainSettings(steps=args.stage1_steps, loss="sum", seed=args.seed, **shared)
        logs["stage1"] = train_stage1(vlm, train_set, settings, checkpointing=checkpointing("stage1"))
    settings = VLMTrainSettings(steps=args.steps, loss=args.loss, beta=args.beta, seed=args.seed + 1, **shared)
    logs["stage2"] = train_stage2(vlm, train_set, settings, args.loops, args.feedback, not args.shared_connector,
                                  args.lora_rank, checkpointing=checkpointing("stage2"))
    quality = evaluate_steps(vlm, heldout, args.loops)
    rows = [{"step": q.step, "accuracy": q.accuracy, "answer ppl": q.perplexity, **q.task_accuracy} for q in quality]
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        vlm.write_checkpoint(tmp)
        write_json(tmp / "metrics.json", {"args": vars(args) | {"func": None}, "heldout": rows,
                                          "heldout_examples": len(heldout),
                                          "train": {k: v.__dict__ for k, v in logs.items()}})
    remove_checkpoints(checkpoint_dir)
    print(format_table(rows))
    print(f"wrote {Path(args.out)}")


def run_ask(args: argparse.Namespace) -> None:
    from depthkit.vlm.model import build_vlm, load_vlm
    from depthkit.vlm.vision import load_image

    image = load_image(args.image)  # fail on a bad image before loading any model
    if args.checkpoint:
        vlm = load_vlm(args.checkpoint, args.device)
    else:
        print("note: no --checkpoint given: the projector is untrained, answers are not meaningful")
        vlm = build_vlm(args.model, args.num_layers, args.dtype, args.device)
    loops = args.loops or vlm.recursive.config.num_loops
    print(vlm.answer(image, args.question, loops, args.max_new_tokens))
