"""`depthkit eval ...`: perplexity, zero-shot accuracy (through lm_eval) and speed.

Every subcommand prints a table and, with `--json F`, writes a result that `depthkit report`
reads back (its `kind` says which evaluation it is).
"""

from __future__ import annotations

import argparse
import sys

from depthkit.cli.common import add_data_args, add_model_args, data_spec, non_negative_int, positive_int, report
from depthkit.data.blocks import sequence_prefix, token_stream
from depthkit.evaluate.perplexity import DEFAULT_WINDOW, default_window, perplexity
from depthkit.evaluate.speed import measure_speed
from depthkit.evaluate.summary import model_summary
from depthkit.evaluate.tasks import DEPTHKIT_TASKS
from depthkit.evaluate.zeroshot import zero_shot
from depthkit.models.loading import load_model
from depthkit.models.skipping import skip_zeroed_attention

HELP = "evaluate a model"


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help=HELP)
    evals = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = evals.add_parser("ppl", help="perplexity over fixed or sliding windows")
    add_model_args(ppl)
    add_data_args(ppl)
    add_ppl_args(ppl)
    ppl.add_argument("--json", default=None, help="write the result here")
    ppl.set_defaults(func=run_ppl)

    zs = evals.add_parser("zeroshot", help="zero-shot multiple-choice accuracy through lm-evaluation-harness")
    add_model_args(zs)
    add_zeroshot_args(zs)
    zs.add_argument("--json", default=None, help="write the result here")
    zs.set_defaults(func=run_zeroshot)

    speed = evals.add_parser("speed", help="prefill and decode throughput, time to first token, peak memory")
    add_model_args(speed)
    add_speed_args(speed)
    speed.add_argument("--json", default=None, help="write the result here")
    speed.set_defaults(func=run_speed)


def add_ppl_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=positive_int, default=None,
                        help=f"tokens per scored window (default: {DEFAULT_WINDOW}, or the model's context if shorter)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="< window for sliding windows (default: window)")
    parser.add_argument("--max-tokens", type=non_negative_int, default=51200,
                        help="evaluate the first N tokens (0: all)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass")


def add_zeroshot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=",".join(DEPTHKIT_TASKS),
                        help="comma-separated: depthkit_cloze, depthkit_continuation (offline), or lm_eval "
                             "task names such as piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa "
                             "(need the hub)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N items of each task")
    parser.add_argument("--task-corpus", default="austen", help="text the offline tasks are built from (heldout split)")
    parser.add_argument("--task-size", type=positive_int, default=500, help="items per offline task")
    parser.add_argument("--task-seed", type=int, default=0, help="seed of the offline tasks' construction")
    parser.add_argument("--zs-batch-size", type=positive_int, default=8, help="lm_eval batch size")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4], help="prefill batch sizes")
    parser.add_argument("--seq-lens", type=int_list, default=[128, 512], help="prefill lengths")
    parser.add_argument("--decode-batch-sizes", type=int_list, default=[1], help="decode batch sizes")
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="prompt length before decoding")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="greedy decode steps on the KV cache")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement (median, min, max)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first")


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated sizes, each >= 1 (a batch of 0 or an empty list measures nothing)."""
    try:
        values = [positive_int(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got '{text}'")
    return values


def load_for_evaluation(name: str, dtype: str, device: str):
    """The model and tokenizer, with attention sublayers that attention drop zeroed really skipped
    (`skip_zeroed_attention`): evaluation measures the dropped model's own speed and cache."""
    model, tokenizer = load_model(name, dtype, device)
    skipped = skip_zeroed_attention(model)
    if skipped:
        print(f"depthkit: skipping the zeroed attention of blocks {skipped} (attention drop)", file=sys.stderr)
    return model, tokenizer


def run_ppl(args: argparse.Namespace) -> None:
    model, tokenizer = load_for_evaluation(args.model, args.dtype, args.device)
    payload = evaluate_ppl(model, tokenizer, args.model, args)
    row = {key: payload[key] for key in ("model", "data", "window", "stride", "tokens_scored", "perplexity", "seconds")}
    report(payload, [row], args.json)


def evaluate_ppl(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    """The `eval ppl` JSON result (`depthkit report` builds the same from its own arguments)."""
    spec = data_spec(args)
    result = perplexity(model, token_stream(tokenizer, spec), window=args.window or default_window(model),
                        stride=args.stride,
                        batch_size=args.batch_size, max_tokens=args.max_tokens or None,
                        prefix=sequence_prefix(tokenizer))
    return {"kind": "perplexity", "model": name, "dtype": args.dtype, "data": spec.describe(),
            **model_summary(model), **result.to_dict()}


def run_zeroshot(args: argparse.Namespace) -> None:
    model, tokenizer = load_for_evaluation(args.model, args.dtype, args.device)
    payload = evaluate_zeroshot(model, tokenizer, args.model, args)
    report(payload, payload["rows"], args.json)


def evaluate_zeroshot(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    result = zero_shot(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.zs_batch_size,
                       corpus=args.task_corpus, seed=args.task_seed, size=args.task_size)
    return {"kind": "zeroshot", "model": name, "dtype": args.dtype, **model_summary(model),
            **result.to_dict(), "rows": result.rows()}


def run_speed(args: argparse.Namespace) -> None:
    model, tokenizer = load_for_evaluation(args.model, args.dtype, args.device)
    payload = evaluate_speed(model, tokenizer, args.model, args)
    report(payload, payload["rows"], args.json)


def evaluate_speed(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    """Speed needs no tokenizer (random prompts); it takes one to share the other evaluations' signature."""
    result = measure_speed(model, args.batch_sizes, args.seq_lens, args.decode_batch_sizes, args.prompt_len,
                           args.new_tokens, args.repeats, args.warmup)
    return {"kind": "speed", "model": name, **model_summary(model), **result.to_dict(), "rows": result.rows()}
