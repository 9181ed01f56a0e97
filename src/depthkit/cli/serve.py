"""`depthkit serve MODEL`: an OpenAI-compatible HTTP server with continuous (depth-wise) batching."""

from __future__ import annotations

import argparse

from depthkit.cli.common import (
    DTYPE_HELP,
    add_exit_rule_arg,
    device_name,
    exit_threshold_or_off,
    loop_count,
    non_negative_float,
    port_number,
    positive_int,
    resolve_exit,
)

HELP = "serve a plain or looped model over an OpenAI-compatible HTTP API (continuous batching)"


def register(subparsers) -> None:
    from depthkit.recursive.config import MAX_LOOPS
    from depthkit.serve.engine import DEFAULT_CAPACITY, DEFAULT_ROWS, HEAD_PATIENCE, SCHEDULES

    parser = subparsers.add_parser("serve", help=HELP, description=__doc__)
    parser.add_argument("model", help="a plain checkpoint (folder, hub id or alias) or a folder written by "
                                      "`depthkit recursive train`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` name clients send (default: the folder's name or the id given)")
    parser.add_argument("--rows", type=positive_int, default=DEFAULT_ROWS,
                        help="sequences decoded together; more requests wait in a queue")
    parser.add_argument("--context", type=positive_int, default=DEFAULT_CAPACITY,
                        help="tokens per sequence (prompt + completion), capped at the model's context")
    parser.add_argument("--schedule", choices=SCHEDULES, default="depthwise",
                        help="depthwise: one loop step per pass, rows at different steps share the block; "
                             "lockstep: plain continuous batching, one whole token per pass")
    parser.add_argument("--head-patience", type=non_negative_float, default=HEAD_PATIENCE,
                        help="depthwise: a done token waits for the LM head, and one head call serves every waiting "
                             "row; it runs once the block passes its waiting rows sat out took this many head calls' "
                             "time (both timed as it serves), or when no row is left computing (0: whenever a token "
                             "is done)")
    parser.add_argument("--max-loops", type=loop_count, default=None,
                        help=f"deepest recursion a request may ask for (`loops`), at most {MAX_LOOPS} "
                             "(default: the model's own depth)")
    parser.add_argument("--exit-threshold", type=exit_threshold_or_off, default=None,
                        help="early-exit threshold (of --exit-rule) for requests that do not set `exit_threshold`; "
                             "off: none (default: the one saved in a looped folder's config.json by `recursive "
                             "train --save-exit-threshold`, as transformers uses it, else none: every token runs "
                             "all its loops)")
    add_exit_rule_arg(parser, from_folder=True)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from depthkit.serve.app import ServedModel, create_app
    from depthkit.serve.engine import Engine
    from depthkit.serve.models import eos_token_ids, load_servable, served_name

    threshold, rule, saved = resolve_exit(args.model, args.exit_threshold, args.exit_rule)
    model, tokenizer = load_servable(args.model, args.dtype, args.device)
    engine = Engine(model, eos_token_ids(model, tokenizer), rows=args.rows, capacity=args.context,
                    schedule=args.schedule, max_loops=args.max_loops, head_patience=args.head_patience)
    name = args.served_model_name or served_name(args.model)
    app = create_app(ServedModel(engine, tokenizer, name, threshold, rule))
    exits = "" if threshold is None else f", early exit {rule} < {threshold}{' (saved in the folder)' * saved}"
    print(f"depthkit: serving {name} on http://{args.host}:{args.port}/v1 ({args.schedule} batching, {args.rows} rows, "
          f"{engine.capacity}-token context, loops {model.config.num_loops}, max {engine.max_loops}{exits})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
