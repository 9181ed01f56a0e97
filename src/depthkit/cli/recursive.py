"""`depthkit recursive train|eval|generate`: looped transformers (RecursiveVLM, Relaxed Recursive)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from depthkit.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    add_checkpoint_args,
    add_data_args,
    add_exit_rule_arg,
    add_model_args,
    add_schedule_args,
    data_spec,
    device_name,
    exit_threshold_or_off,
    finite_float,
    float_at_least,
    loop_count,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    report,
    resolve_exit,
    run_context,
)
from depthkit.data import interleaved_blocks, token_blocks
from depthkit.data.corpora import DEFAULT_CALIB, load_documents
from depthkit.errors import DepthkitError
from depthkit.evaluate.perplexity import check_context
from depthkit.models.adapters import get_adapter
from depthkit.models.loading import load_model, load_tokenizer
from depthkit.recursive.config import (
    CONFIG_FILE,
    CONNECTOR_NORMS,
    FEEDBACKS,
    FUSIONS,
    PROJECTIONS,
    RESIDUALS,
    default_of,
)
from depthkit.recursive.generate import DEFAULT_THRESHOLD, early_exit_nll, generate
from depthkit.recursive.loss import LOSSES
from depthkit.recursive.model import LAYER_PICKS, RecursiveModel, tokenizer_folder, truncate_layers
from depthkit.recursive.relaxed import INITS, LOOP_NORMS, SHARINGS, relax, sharing_plan
from depthkit.recursive.train import PARTS, RecursiveTrainSettings, step_perplexities, train
from depthkit.training import check_new_run, checkpoints_beside, remove_checkpoints
from depthkit.utils.io import check_output_dir, format_table, write_json
from depthkit.utils.precision import MIXED_PRECISIONS

DEFAULT_LOOPS = default_of("num_loops")
DEFAULTS = RecursiveTrainSettings()

HELP = "recursive (looped) transformers: train, eval, generate"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recursive", help=HELP)
    commands = parser.add_subparsers(dest="recursive_command", required=True, metavar="ACTION")
    _register_train(commands.add_parser("train", help="build (wrap or relax) and train a recursive model",
                                        conflict_handler="resolve"))
    _register_eval(commands.add_parser("eval", help="held-out perplexity at every step 1..R (+ early exit)"))
    _register_generate(commands.add_parser("generate", help="generate at any depth, with KV cache and early exit"))


# -- train -------------------------------------------------------------------------------------
def _register_train(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--dtype", default="float32",  # replaces add_model_args' (the parser resolves conflicts)
                   help="dtype of the weights (trained weights need float32; --mixed-precision autocasts the "
                        "matmuls): " + DTYPE_HELP)
    p.add_argument("--layers", type=positive_int, help="keep only N layers of the base model (cheap experiments; "
                                                       "default: all)")
    p.add_argument("--layer-pick", default="first", choices=LAYER_PICKS,
                   help="which --layers to keep: the first N, or N evenly spaced ones (the last kept)")
    p.add_argument("--relax", type=positive_int, metavar="K", help="convert to K shared layers (Relaxed Recursive) "
                                                          "instead of looping the whole decoder")
    p.add_argument("--sharing", default="cycle", choices=SHARINGS,
                   help="with --relax: which original layers a shared layer stands for (cycle: every K-th; "
                        "sequence: K consecutive runs; middle: the first and last layers stay unshared)")
    p.add_argument("--init", default="stepwise", choices=INITS,
                   help="with --relax: what each shared layer starts from (evenly spaced original layers, the "
                        "lowest tied one, the average of those tied, or random)")
    p.add_argument("--loop-norms", default="shared", choices=LOOP_NORMS,
                   help="with --relax: each loop's norms start from the shared layer's (the method's) or copy the "
                        "original layer's (better than the method; the saved config records it)")
    p.add_argument("--loop-lora-rank", default="0",
                   help="per-loop LoRA rank (int or 'full'): the relaxation's, or one LoRA per loop of the "
                        "looped decoder without --relax")
    p.add_argument("--feedback", choices=FEEDBACKS,
                   help="what the next step reads: the connector's new input (the default) or the last hidden "
                        "state; --relax feeds the hidden state on, as the converted model did")
    p.add_argument("--loops", type=loop_count, help=f"recursion steps R used in training (and saved default; "
                                             f"{DEFAULT_LOOPS} unless --relax, which loops N/K times)")
    p.add_argument("--ends", type=non_negative_int,
                   help="without --relax: run the first and last N layers once (prelude, and coda after every "
                        "step) and loop only the layers between (default 0; with --relax, --sharing middle)")
    p.add_argument("--connector-k", type=positive_int, default=default_of("connector_k"),
                   help="block layers whose outputs the connector reads (evenly spaced, the last included)")
    p.add_argument("--connector-layers",
                   help="comma-separated block positions (0-based) the connector reads (default: --connector-k "
                        "evenly spaced ones)")
    p.add_argument("--projection", default=default_of("projection"), choices=PROJECTIONS,
                   help="the connector's projection of what it reads")
    p.add_argument("--fuse", default=default_of("fuse"), choices=FUSIONS,
                   help="how the connector combines the layers it reads: a sum, or a sum with learned softmax weights")
    p.add_argument("--residual", default=default_of("residual"), choices=RESIDUALS,
                   help="what the connector adds onto: the prelude's output (the embeddings without --ends), this "
                        "step's input, or its output")
    p.add_argument("--scale-init", type=finite_float, default=default_of("scale_init"),
                   help="initial connector scale (0: steps 2..R start as copies of step 1); the connector "
                        "defaults are benchmarks/recursion.py's measured recipe")
    p.add_argument("--connector-norm", default=default_of("connector_norm"), choices=CONNECTOR_NORMS,
                   help="size the connector's update by the RMS of the residual it is added onto (token by token) "
                        "or by the input embeddings' RMS")
    p.add_argument("--modalities", type=positive_int, default=1,
                   help="token types with their own connector norm and projection (a VLM has 2)")
    p.add_argument("--lora-rank", type=non_negative_int, default=0, help="LoRA shared by every loop (0: none)")
    p.add_argument("--train", default=",".join(DEFAULTS.trainable),
                   help=f"comma-separated parts to train: {', '.join(PARTS)}")
    p.add_argument("--loss", default=DEFAULTS.loss, choices=LOSSES,
                   help="recursion loss over steps 1..R: monotonic (each step penalised for being worse than the "
                        "one before), sum of every step's, or the last step's only")
    p.add_argument("--beta", type=float_at_least(1.0), default=DEFAULTS.beta,
                   help="monotonic loss: weight of a step's loss increase over the step before (>= 1)")
    p.add_argument("--no-detach", action="store_true", help="do not detach the step r-1 loss (hinge form)")
    p.add_argument("--steps", type=non_negative_int, default=DEFAULTS.steps,
                   help="optimizer steps (0: convert/wrap and save only)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per training and held-out block")
    p.add_argument("--train-blocks", type=positive_int, default=400, help="training blocks of --seq-len tokens")
    p.add_argument("--eval-blocks", type=positive_int, default=8,
                   help="held-out blocks evaluated every --eval-every steps")
    add_interleave_arg(p, "the training and held-out blocks")
    add_schedule_args(p, DEFAULTS, lr_of=" of everything but the connector")
    p.add_argument("--connector-lr", type=positive_float, default=DEFAULTS.connector_lr,
                   help="peak learning rate of the connector")
    p.add_argument("--eval-every", type=positive_int, default=DEFAULTS.eval_every,
                   help="steps between held-out evaluations of every recursion step")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower")
    p.add_argument("--mixed-precision", default=DEFAULTS.mixed_precision, choices=MIXED_PRECISIONS,
                   help="autocast of training; auto: bf16 where the device multiplies it natively, else none")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of the data order and of --relax's initialisation")
    # every offline domain, as `compress` and `recover` calibrate: a model trained on one book serves other
    # text badly (benchmarks/serving.py: held-out perplexity in the thousands trained on Austen, ~380 on mix)
    add_data_args(p, "--data", split="calib", default=DEFAULT_CALIB)
    add_data_args(p, "--eval-data", split="heldout", default=DEFAULT_CALIB)
    p.add_argument("--out", required=True,
                   help="output folder, loadable by depthkit and by plain transformers (remote code): config.json, "
                        "model.safetensors, modeling_depthkit_looped.py, the tokenizer and recursive_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder depthkit wrote")
    p.add_argument("--save-exit-threshold", type=non_negative_float, metavar="X",
                   help="default early exit stored in the folder's config.json for whoever loads it (transformers "
                        "remote code; depthkit recursive generate and serve): a token stops at the first step r >= 2 "
                        "whose --exit-rule distance to the step before is below X; loaders can still override "
                        "it (default: none, early exit off: every token runs all R steps)")
    add_exit_rule_arg(p, lead="the rule saved with --save-exit-threshold: ")
    add_checkpoint_args(p, DEFAULTS, "OUT.checkpoints/")
    p.add_argument("--json", help="also write the training history here")
    p.set_defaults(func=run_train)


def _rank(value: str) -> int | str:
    if value == "full":
        return value
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise DepthkitError(f"--loop-lora-rank must be an integer >= 0 or 'full', got '{value}'")
    return rank


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise DepthkitError(f"expected comma-separated integers, got '{value}'") from err


def build_model(args: argparse.Namespace):
    """The base model (optionally truncated), wrapped or relaxed as the arguments say."""
    base, tokenizer = load_model(args.model, args.dtype, args.device)
    if args.layers:
        truncate_layers(base, args.layers, args.layer_pick)
    rank = _rank(args.loop_lora_rank)
    if args.relax:
        check_relax_options(args, len(get_adapter(base).layers(base)))  # before the conversion's SVDs
        model = relax(base, args.relax, args.sharing, args.init, rank, args.seed, args.loop_norms)
    else:
        loops = DEFAULT_LOOPS if args.loops is None else args.loops
        model = RecursiveModel.wrap(
            base, num_loops=loops, feedback=args.feedback or "connector", ends=args.ends or 0,
            connector_k=args.connector_k, connector_layers=_int_list(args.connector_layers),
            projection=args.projection, fuse=args.fuse, residual=args.residual, scale_init=args.scale_init,
            connector_norm=args.connector_norm, num_modalities=args.modalities, lora_rank=args.lora_rank,
            loop_lora_rank=rank, relaxed_loops=loops if rank else 0)
    return model.to(args.device), tokenizer


def check_relax_options(args: argparse.Namespace, num_layers: int) -> None:
    """Refuse the looped-decoder options that a relaxation decides itself, rather than ignore them.

    The sharing plan fixes the loops (N/K) and which layers stay unshared, and the converted model
    feeds its hidden state on; training or saving another R would run loops without their LoRA.
    """
    plan_loops = sharing_plan(args.sharing, num_layers, args.relax).loops
    if args.loops is not None and args.loops != plan_loops:
        raise DepthkitError(f"--relax {args.relax} with --sharing {args.sharing} loops the shared layers "
                            f"{plan_loops} times; drop --loops {args.loops} (any R can still be asked at "
                            "eval and generate time)")
    if args.ends is not None:
        raise DepthkitError("--ends applies to a looped decoder; with --relax use --sharing middle to keep the "
                            "first and last layers unshared")
    if args.feedback == "connector":
        raise DepthkitError("--feedback connector applies to a looped decoder; a relaxed model feeds each loop's "
                            "hidden state on, as the original layers did")


def run_train(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    checkpoint_dir = checkpoints_beside(args.out)
    check_new_run(checkpoint_dir, args.resume)  # before loading anything
    for corpus in (args.data, args.eval_data):
        load_documents(corpus)  # an unknown corpus, an empty or non-UTF-8 file: fail before the model loads
    model, tokenizer = build_model(args)
    check_context(model.base, args.seq_len)  # positions past the context would train on noise, silently
    settings = RecursiveTrainSettings(
        steps=args.steps, loops=model.config.num_loops, batch_size=args.batch_size, lr=args.lr,
        connector_lr=args.connector_lr, warmup_steps=args.warmup_steps, loss=args.loss, beta=args.beta,
        detach=not args.no_detach, eval_every=args.eval_every,
        trainable=tuple(t.strip() for t in args.train.split(",") if t.strip() and
                        (t.strip() != "connector" or model.connector is not None)),
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
    settings.validate()
    blocks = interleaved_blocks if args.interleave else token_blocks
    train_ids = blocks(tokenizer, data_spec(args, "--data"), args.train_blocks, args.seq_len) if args.steps else None
    eval_ids = blocks(tokenizer, data_spec(args, "--eval-data"), args.eval_blocks, args.seq_len)
    result = train(model, train_ids, eval_ids, settings, checkpoint_dir=checkpoint_dir, resume=args.resume,
                   context=run_context(args)) if args.steps else None
    model.save_pretrained(args.out, tokenizer, args.overwrite, exit_threshold=args.save_exit_threshold,
                          exit_rule=args.exit_rule)
    remove_checkpoints(checkpoint_dir)
    print(f"saved recursive model to {args.out}")
    if result is not None and result.evaluations:
        last = result.evaluations[-1]["perplexity"]
        rows = [{"step": i + 1, "heldout_ppl": p} for i, p in enumerate(last)]
        report(result.to_dict(), rows, args.json)


# -- eval --------------------------------------------------------------------------------------
def load_recursive(folder: str, dtype: str, device: str):
    """A saved recursive model and its tokenizer (beside it, or in `base/` in older folders)."""
    path = Path(folder)
    if not (path / CONFIG_FILE).is_file():
        raise DepthkitError(f"{folder} is not a recursive model folder (no {CONFIG_FILE})")
    model = RecursiveModel.from_pretrained(path, dtype, device)
    return model, load_tokenizer(str(tokenizer_folder(path)))


def add_interleave_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help=f"take {what} in turn from every document of the corpus, a mixture's components in equal "
                        "shares (--no-interleave: the first blocks of the documents concatenated, i.e. mostly the "
                        "first document)")


def _register_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="folder written by `depthkit recursive train`")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    p.add_argument("--loops", type=loop_count, help="recursion steps R (default: the saved one)")
    p.add_argument("--blocks", type=positive_int, default=8, help="held-out blocks of --seq-len tokens scored")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per held-out block")
    p.add_argument("--exit-threshold", type=non_negative_float, action="append",
                   help="also score with early exit at this threshold of --exit-rule (repeatable; token by token, "
                        "slower)")
    add_exit_rule_arg(p, from_folder=True)
    p.add_argument("--exit-tokens", type=positive_int, default=256,
                   help="tokens scored per early-exit threshold, the opening tokens of each held-out block in equal "
                        "shares (so every document of --data counts)")
    add_interleave_arg(p, "the held-out blocks")
    # every offline domain's held-out text, as `recursive train` evaluates: one book alone says little about others
    add_data_args(p, "--data", split="heldout", default=DEFAULT_CALIB)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    _, args.exit_rule, _ = resolve_exit(args.checkpoint, None, args.exit_rule)
    model, tokenizer = load_recursive(args.checkpoint, args.dtype, args.device)
    check_context(model.base, args.seq_len)  # positions past the context would score noise, silently
    loops = args.loops or model.config.num_loops
    blocks = (interleaved_blocks if args.interleave else token_blocks)(tokenizer, data_spec(args), args.blocks,
                                                                       args.seq_len)
    ppl = step_perplexities(model, blocks, loops)
    rows = [{"step": i + 1, "heldout_ppl": p} for i, p in enumerate(ppl)]
    result: dict = {"checkpoint": args.checkpoint, "loops": loops, "data": data_spec(args).describe(),
                    "step_perplexity": ppl}
    print(format_table(rows))
    if args.exit_threshold:
        window = max(2, min(args.seq_len, args.exit_tokens // len(blocks)))
        openings = blocks[:, :window].flatten()
        exits = []
        for threshold in [None, *args.exit_threshold]:
            nll, loops_report = early_exit_nll(model, openings, loops, threshold, window, len(blocks),
                                               rule=args.exit_rule)
            exits.append({"threshold": threshold, "perplexity": math.exp(nll), **loops_report.to_dict()})
        result["early_exit"] = exits
        result["exit_rule"] = args.exit_rule
        print(format_table([{"exit_threshold": e["threshold"] if e["threshold"] is not None else "none (all R)",
                             "ppl": e["perplexity"], "mean_steps": e["mean_steps"], "loops_saved": e["loops_saved"]}
                            for e in exits]))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")


# -- generate ----------------------------------------------------------------------------------
def _register_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="folder written by `depthkit recursive train`")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    p.add_argument("--loops", type=loop_count, help="recursion steps R (default: the saved one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="greedy tokens generated at most")
    p.add_argument("--exit-threshold", type=exit_threshold_or_off, nargs="?", const=DEFAULT_THRESHOLD,
                   help=f"early exit when the --exit-rule distance between consecutive steps < threshold (flag "
                        f"alone: {DEFAULT_THRESHOLD}; off: every token runs all R steps; default: the one saved in the "
                        "folder's config.json by `recursive train --save-exit-threshold`, as transformers uses it, "
                        "else off)")
    add_exit_rule_arg(p, from_folder=True)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix per token (reference)")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    threshold, rule, saved = resolve_exit(args.checkpoint, args.exit_threshold, args.exit_rule)
    if saved and args.no_cache:
        raise DepthkitError(f"{args.checkpoint} saves early exit at {threshold} by default, which needs the KV "
                            "cache; add --exit-threshold off to run --no-cache")
    model, tokenizer = load_recursive(args.checkpoint, args.dtype, args.device)
    ids = torch.tensor([tokenizer(args.prompt)["input_ids"]], device=args.device)
    result = generate(model, ids, args.max_new_tokens, args.loops, threshold, tokenizer.eos_token_id,
                      use_cache=not args.no_cache, progress=True, exit_rule=rule)
    text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
    print(args.prompt + text)
    summary = {"prompt": args.prompt, "completion": text, "loops": args.loops or model.config.num_loops,
               "exit_threshold": threshold, "exit_rule": rule, **result.loops.to_dict()}
    if threshold is not None:
        source = " (the folder's saved default; --exit-threshold off runs all R)" if saved else ""
        print(f"early exit ({rule} < {threshold}{source}): {result.loops.to_dict()['mean_steps']:.2f} of "
              f"{result.loops.max_steps} steps per token, {100 * result.loops.saved_fraction:.1f}% of loops saved")
    if args.json:
        print(f"wrote {write_json(args.json, summary)}")
