"""`depthkit vlm`: train a (recursive) LLaVA-style VLM on the offline VQA set, or ask it a question."""

from __future__ import annotations

import argparse
from pathlib import Path

from depthkit.cli.common import add_model_args, non_negative_int, positive_int
from depthkit.errors import require
from depthkit.recursive.config import check_loops
from depthkit.utils.io import atomic_output_dir, check_output_dir, format_table, write_json

HELP = "recursive vision-language model: train, ask"


def register(subparsers) -> None:
    parser = subparsers.add_parser("vlm", help=HELP)
    commands = parser.add_subparsers(dest="vlm_command", required=True, metavar="ACTION")
    _register_train(commands)
    _register_ask(commands)


def _register_train(commands) -> None:
    parser = commands.add_parser("train", help="stage 1 (projector) then stage 2 (recursion) on the offline VQA set")
    add_model_args(parser)
    parser.add_argument("--num-layers", type=positive_int, default=None, help="keep the LLM's first N layers (cheaper)")
    parser.add_argument("--loops", type=positive_int, default=3, help="recursion steps R trained in stage 2")
    parser.add_argument("--feedback", choices=("connector", "vanilla"), default="connector")
    parser.add_argument("--shared-connector", action="store_true", help="one connector for text and vision tokens")
    parser.add_argument("--loss", choices=("monotonic", "sum", "last"), default="monotonic")
    parser.add_argument("--beta", type=float, default=2.0, help="monotonic loss penalty on a loss increase")
    parser.add_argument("--lora-rank", type=non_negative_int, default=8, help="LoRA shared by every loop (0: none)")
    parser.add_argument("--stage1-steps", type=positive_int, default=150)
    parser.add_argument("--steps", type=non_negative_int, default=150, help="stage-2 steps")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-mnist", type=positive_int, default=1200)
    parser.add_argument("--num-digits", type=positive_int, default=300)
    parser.add_argument("--num-pairs", type=positive_int, default=600)
    parser.add_argument("--photo-variants", type=positive_int, default=6)
    parser.add_argument("--eval-examples", type=positive_int, default=None,
                        help="held-out examples scored (default all)")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                        help="stage 2: save a reloadable checkpoint to <out>-checkpoints/step-N every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/vlm", help="checkpoint folder")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run_train)


def _register_ask(commands) -> None:
    parser = commands.add_parser("ask", help="answer a question about an image at any recursion depth")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--loops", type=positive_int, default=None, help="recursion steps (default: as trained)")
    parser.add_argument("--checkpoint", default=None, help="folder written by `depthkit vlm train`")
    add_model_args(parser)
    parser.add_argument("--num-layers", type=positive_int, default=None, help="without --checkpoint: LLM layers kept")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.set_defaults(func=run_ask)


def run_train(args: argparse.Namespace) -> None:
    from depthkit.vlm.batches import VQABatches
    from depthkit.vlm.data import VQAConfig, build_vqa, dataset_features
    from depthkit.vlm.evaluate import evaluate_steps
    from depthkit.vlm.model import build_vlm
    from depthkit.vlm.train import TrainSettings, train_stage1, train_stage2

    check_output_dir(args.out, args.overwrite)
    check_loops(args.loops)
    require(args.steps >= 1 and args.stage1_steps >= 0, "--steps must be >= 1 and --stage1-steps >= 0")
    dataset = build_vqa(VQAConfig(args.seed, args.num_mnist, args.num_digits, args.num_pairs, args.photo_variants))
    features = dataset_features(dataset)
    vlm = build_vlm(args.model, args.num_layers, args.dtype, args.device, with_encoder=False)
    train_set = VQABatches(vlm, dataset, "train", features)
    heldout = VQABatches(vlm, dataset, "heldout", features, limit=args.eval_examples)
    settings = TrainSettings(steps=args.stage1_steps, batch_size=args.batch_size, lr=args.lr, loss="sum",
                             seed=args.seed)
    logs = {}
    if args.stage1_steps:
        logs["stage1"] = train_stage1(vlm, train_set, settings)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                             beta=args.beta, seed=args.seed + 1, checkpoint_every=args.checkpoint_every,
                             checkpoint_dir=f"{Path(args.out)}-checkpoints")
    logs["stage2"] = train_stage2(vlm, train_set, settings, args.loops, args.feedback, not args.shared_connector,
                                  args.lora_rank)
    quality = evaluate_steps(vlm, heldout, args.loops)
    rows = [{"step": q.step, "accuracy": q.accuracy, "answer ppl": q.perplexity, **q.task_accuracy} for q in quality]
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        vlm.write_checkpoint(tmp)
        write_json(tmp / "metrics.json", {"args": vars(args) | {"func": None}, "heldout": rows,
                                          "heldout_examples": len(heldout),
                                          "train": {k: v.__dict__ for k, v in logs.items()}})
    print(format_table(rows))
    print(f"wrote {Path(args.out)}")


def run_ask(args: argparse.Namespace) -> None:
    from depthkit.vlm.model import build_vlm, load_vlm
    from depthkit.vlm.vision import load_image

    image = load_image(args.image)  # fail on a bad image before loading any model
    if args.loops is not None:
        check_loops(args.loops)
    if args.checkpoint:
        vlm = load_vlm(args.checkpoint, args.device)
    else:
        print("note: no --checkpoint given: the projector is untrained, answers are not meaningful")
        vlm = build_vlm(args.model, args.num_layers, args.dtype, args.device)
    loops = args.loops or vlm.recursive.config.num_loops
    print(vlm.answer(image, args.question, loops, args.max_new_tokens))
