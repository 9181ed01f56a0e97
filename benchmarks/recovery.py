"""Recovery fine-tuning of a 24-block SmolLM2 for a short CPU budget: perplexity and behaviour before/after.

    .venv/bin/python benchmarks/recovery.py                      # 200 steps x 1 x 512 tokens, LoRA rank 8
    .venv/bin/python benchmarks/recovery.py --method flatten --calib-blocks 64 --name recovery_flatten_built
    .venv/bin/python benchmarks/recovery.py --model runs/flat24 --name recovery_flatten   # a compressed checkpoint
    .venv/bin/python benchmarks/recovery.py --distill-weight 0.5 --self-distill 50 --name recovery_self_distill
    .venv/bin/python benchmarks/recovery.py --steps 20 --quick    # smoke run

Compressed model: `--model PATH`, or (default) the 30-block SmolLM2-135M-Instruct compressed here by the
library (`depthkit.compress`) with `--method` (default shortgpt; `--option KEY=VALUE` as in `depthkit
compress`) by `--remove` blocks, calibrated on `--calib-blocks` x 256 tokens of the training text (8:
ShortGPT then removes the blocks of the recorded runs, [12, 13, 14, 15, 17, 25]).
Training text: `--train-data` (default: every offline domain but source code, sampled over the calib
splits), so that the one domain left out shows whether recovery repairs the model or only adapts it
to what it was trained on. Held-out: `--eval-windows` x 512 tokens sampled over the heldout split of
EVERY domain; the original is measured on the same blocks. In domain / out of domain: geometric mean
of perplexity over the domains in / not in the training text.
Behaviour retention (`depthkit.evaluate.behaviour`), before and after recovery: top-1 agreement and
KL(original || model) per token on those held-out blocks, and on depthkit's 24 evaluation chat prompts
(never trained on) the share of identical greedy answers and the KL per token on the original's answers.
Zero-shot, for the original and before and after recovery: depthkit's cloze and continuation tasks built
from the heldout split of each prose domain (`--zeroshot-limit` items per task and domain), and the
accuracy retained relative to the original, averaged over those domains.
`--distill-weight` distils from the original on the text; `--self-distill N` also trains every
`--self-distill-every`-th step on the original's greedy answers to N chat prompts over training passages.
Writes benchmarks/results/<name>.{json,md,png} (`--name`, default `recovery`; `_quick` suffix for --quick).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from depthkit.cli.common import non_negative_int  # noqa: E402
from depthkit.cli.compress import parse_options  # noqa: E402
from depthkit.compress import compress, get_method  # noqa: E402
from depthkit.data import DataSpec  # noqa: E402
from depthkit.data.blocks import sample_blocks  # noqa: E402
from depthkit.data.corpora import MIX_COMPONENTS, mixture_sources  # noqa: E402
from depthkit.errors import require  # noqa: E402
from depthkit.evaluate.behaviour import BehaviourSuite  # noqa: E402
from depthkit.evaluate.report import geo_mean  # noqa: E402
from depthkit.evaluate.zeroshot import (  # noqa: E402
    DOMAIN_ITEMS,
    ZEROSHOT_DOMAINS,
    retention,
    retention_interval,
    zero_shot_record,
)
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recover import RecoverySettings, recover  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEFT_OUT = "pycode"  # never trained on by default: the out-of-domain check
TRAIN_DEFAULT = "+".join(d for d in MIX_COMPONENTS if d != LEFT_OUT)
CALIB_LEN = 256  # tokens per calibration sequence of the model built here


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a compressed checkpoint (default: build one with --method)")
    parser.add_argument("--original", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="shortgpt", help="registered compression method of the model built here")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --method (repeatable), as in `depthkit compress`")
    parser.add_argument("--remove", type=int, default=6, help="blocks removed when building the model")
    parser.add_argument("--calib-blocks", type=int, default=8,
                        help=f"calibration sequences of {CALIB_LEN} tokens of the training text, to build the model")
    parser.add_argument("--train-data", default=TRAIN_DEFAULT, help=f"training corpus (default {TRAIN_DEFAULT})")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len tokens per domain")
    parser.add_argument("--distill-weight", type=float, default=0.0, help="> 0: distil from the original")
    parser.add_argument("--self-distill", type=int, default=0, metavar="N",
                        help="> 0: also learn the original's answers to N chat prompts over training passages")
    parser.add_argument("--self-distill-every", type=int, default=4, metavar="K",
                        help="with --self-distill: every K-th step is a batch of those answers")
    parser.add_argument("--seed", type=int, default=0, help="seeds the LoRA start and the order of the training blocks")
    parser.add_argument("--zeroshot-limit", type=non_negative_int, default=DOMAIN_ITEMS,
                        help=f"zero-shot items per task and domain ({', '.join(ZEROSHOT_DOMAINS)}), before and after "
                             "recovery (0: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids spin-wait collapse on a CPU shared with other jobs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 held-out windows per domain, 8 zero-shot items per task, *_quick")
    parser.add_argument("--name", default="recovery", help="results file prefix (e.g. recovery_flatten)")
    args = parser.parse_args()
    if args.quick:
        args.eval_windows, args.zeroshot_limit = 2, min(args.zeroshot_limit, 8)
    return args


def compressed_model(args: argparse.Namespace, calib: DataSpec) -> tuple[Any, str, dict[str, Any] | None]:
    """`--model` as given, or the original compressed here by the library's `--method`; with how it
    was made (the compression card, None for a given checkpoint) and a one-line description."""
    if args.model:
        return load_model(args.model)[0], args.model, None
    model, tokenizer = load_model(args.original)
    report = compress(model, args.method, target_layers=model.config.num_hidden_layers - args.remove,
                      calib_ids=sample_blocks(tokenizer, calib, args.calib_blocks, CALIB_LEN),
                      **parse_options(args.option))
    removed = report.details.get("removed_blocks")
    what = f"minus blocks {removed}" if removed is not None else (
        f"{report.num_layers_before} -> {report.num_layers_after} blocks")
    return model, f"{args.original} {what} ({args.method})", report.to_dict()


def check_method(args: argparse.Namespace) -> None:
    """An unknown method or option, or a method without a standard checkpoint (recovery saves one):
    refused before any model is loaded."""
    if not args.model:
        require(get_method(args.method, **parse_options(args.option)).produces_checkpoint,
                f"method '{args.method}' does not produce a standard checkpoint to recover")


def main() -> None:
    args = parse_args()
    check_method(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = DataSpec(args.train_data, "calib")
    trained_on = mixture_sources(args.train_data)
    settings = RecoverySettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                lora_rank=args.lora_rank, eval_every=args.eval_every,
                                eval_tokens=args.eval_windows * args.seq_len * len(trained_on), checkpoint_every=0,
                                distill_weight=args.distill_weight, self_distill=args.self_distill,
                                self_distill_every=args.self_distill_every, seed=args.seed)
    settings.validate()
    original, tokenizer = load_model(args.original)
    suite = BehaviourSuite(original, tokenizer, list(MIX_COMPONENTS), "heldout", blocks=args.eval_windows,
                           block_len=args.seq_len)
    # What the trainer scores during training: the held-out text of the training domains.
    train_heldout = torch.cat([suite.texts[d].flatten() for d in MIX_COMPONENTS if d in trained_on])

    def measure(model) -> dict[str, Any]:
        return suite.measure(model) | zero_shot_record(model, tokenizer, args.zeroshot_limit)

    measured = {"original": measure(original)}
    base_depth = original.config.num_hidden_layers
    model, source, compression = compressed_model(args, train)
    measured["before"] = measure(model)
    teacher = original if args.distill_weight > 0 or args.self_distill > 0 else None
    if teacher is None:
        del original
    blocks = settings.text_steps() * settings.batch_size
    with tempfile.TemporaryDirectory() as out:
        card = recover(model, tokenizer, sample_blocks(tokenizer, train, blocks, args.seq_len).flatten(),
                       train_heldout, settings, out, teacher=teacher,
                       meta={"model": source, "data": train.describe(), "eval_data": "heldout of the training domains"})
        measured["after"] = measure(load_model(str(Path(out) / "model"))[0])
    write_results(args, card, measured, trained_on, base_depth, source, compression, model.config.num_hidden_layers)


def write_results(args, card, measured: dict[str, dict], trained_on: list[str], base_depth: int, source: str,
                  compression: dict[str, Any] | None, depth: int) -> None:
    stem = f"{args.name}{'_quick' if args.quick else ''}"
    ppl = {key: {d: b["perplexity"] for d, b in m["domains"].items()} for key, m in measured.items()}
    rows = perplexity_rows(args, card, ppl, trained_on, base_depth, depth)

    def gap(column: str) -> float | None:
        base, before, after = (r[column] for r in rows)
        return (before - after) / (before - base) if None not in (base, before, after) and before != base else None

    result = {
        "model": source, "compression": compression,
        "dropped_blocks": (compression or {}).get("details", {}).get("removed_blocks"),
        "train_data": DataSpec(args.train_data, "calib").describe(),
        "trained_domains": trained_on, "heldout": f"{card['settings']['eval_tokens'] // len(trained_on)} tokens "
        "sampled over each domain's heldout split", "perplexity": ppl, "behaviour": measured,
        "gap_closed": {"in_domain": gap("in-domain (geo-mean)"), "out_of_domain": gap("out-of-domain (geo-mean)")},
        "tokens_trained": card["tokens_trained"], "trainable_parameters": card["trainable_parameters"],
        "self_distill": card.get("self_distill"),
        "seconds": card["seconds"], "settings": card["settings"], "evals": card["evals"],
        "losses": [{k: entry[k] for k in ("step", "loss", "self_distill_kl") if k in entry}
                   for entry in card["losses"]],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", result)
    table, behaviour = format_table(rows), format_table(behaviour_rows(measured))
    (RESULTS / f"{stem}.md").write_text(markdown(args, card, result, table, behaviour, stem))
    plot_curve(card, rows[0]["in-domain (geo-mean)"], base_depth, RESULTS / f"{stem}.png")
    print(f"{table}\n\n{behaviour}")


def perplexity_rows(args, card, ppl: dict[str, dict[str, float]], trained_on: list[str], base_depth: int,
                    depth: int) -> list[dict[str, Any]]:
    """Per model: perplexity per domain and its geometric means in and out of the training domains."""
    def row(label: str, key: str, blocks: int, seconds: float) -> dict:
        values = ppl[key]
        inside = [values[d] for d in values if d in trained_on]
        outside = [values[d] for d in values if d not in trained_on]
        return {"model": label, "blocks": blocks, **{f"{d} ppl": v for d, v in values.items()},
                "in-domain (geo-mean)": geo_mean(inside), "out-of-domain (geo-mean)": geo_mean(outside),
                "train s": seconds}

    return [row(f"original ({args.original})", "original", base_depth, 0.0),
            row("compressed, before recovery", "before", depth, 0.0),
            row(f"after LoRA recovery ({card['steps']} steps)", "after", depth, card["seconds"])]


def behaviour_rows(measured: dict[str, dict]) -> list[dict[str, Any]]:
    """Before and after recovery: agreement with the original per domain, and on the chat prompts."""
    base, base_items = measured["original"]["zeroshot"], measured["original"]["zeroshot_items"]

    def row(label: str, m: dict) -> dict[str, Any]:
        zeroshot = {f"{d} zero-shot": m["zeroshot"][d] for d in base}
        interval = retention_interval(m["zeroshot_items"], base_items) if base else None
        return {"model": label, **{f"{d} top-1": b["top1_agreement"] for d, b in m["domains"].items()},
                "mean top-1": m["mean_top1_agreement"], "mean KL": m["mean_kl"],
                "chat same answer": m["chat"]["same_answer"], "chat top-1": m["chat"]["answer_top1_agreement"],
                "chat KL/token": m["chat"]["answer_kl"], **zeroshot,
                **({"zero-shot retained": retention(m["zeroshot"], base),
                    "95% interval": f"{interval[0]:.3f} - {interval[1]:.3f}"} if base else {})}

    return [row("before recovery", measured["before"]), row("after recovery", measured["after"])]


def markdown(args, card, result: dict[str, Any], table: str, behaviour: str, stem: str) -> str:
    curve = format_table([{"step": 0, "training domains' held-out ppl": card["perplexity_before"]},
                          *({"step": e["step"], "training domains' held-out ppl": e["perplexity"]}
                            for e in card["evals"])])
    closed, chat = result["gap_closed"], result["self_distill"]
    self_distill = (f", self-distillation on {chat['examples']} of the original's greedy chat answers "
                    f"({chat['answer_tokens']} answer tokens) on one step in {chat['every']}" if chat else "")
    return (
        f"# Recovery fine-tuning ({result['model']})\n\n"
        f"LoRA rank {args.lora_rank} on q/k/v/o/gate/up/down of every block, {card['steps']} steps x "
        f"{args.batch_size} x {args.seq_len} tokens sampled over {result['train_data']} ({card['tokens_trained']} "
        f"tokens, lr {args.lr}, distill weight {args.distill_weight}{self_distill}, seed {args.seed}). "
        f"Held-out: {result['heldout']}; "
        f"in domain = {', '.join(result['trained_domains'])}, out of domain = the rest.\n\n{table}\n\n"
        f"Recovery closed {_pct(closed['in_domain'])} of the gap to the original in domain and "
        f"{_pct(closed['out_of_domain'])} out of domain.\n\n"
        "Behaviour retention against the original: top-1 agreement of the next-token predictions per domain "
        "(same held-out blocks), mean KL(original || model) per token; on the 24 evaluation chat prompts (never "
        "trained on), the share of greedy answers identical to the original's, top-1 agreement and KL per token on "
        f"the original's answers{zeroshot_note(args, result)}:\n\n{behaviour}\n\n"
        f"Held-out perplexity during training:\n\n{curve}\n\n![curve]({stem}.png)\n")


def zeroshot_note(args, result: dict[str, Any]) -> str:
    base = result["behaviour"]["original"]["zeroshot"]
    if not base:
        return ""
    accuracy = ", ".join(f"{d} {a:.3f}" for d, a in base.items())
    return (f"; zero-shot: average accuracy of depthkit's cloze and continuation tasks ({args.zeroshot_limit} items "
            f"each, built from the heldout split of each domain; original: {accuracy}), `retained` = accuracy over "
            "the original's, averaged over those domains")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot_curve(card, base_ppl: float, base_depth: int, path: Path) -> None:
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.5))
    text = [e for e in card["losses"] if "self_distill_kl" not in e]
    chat = [e for e in card["losses"] if "self_distill_kl" in e]
    ax_loss.plot([e["step"] for e in text], [e["loss"] for e in text], lw=0.8, label="text steps")
    if chat:
        ax_loss.plot([e["step"] for e in chat], [e["loss"] for e in chat], ".", ms=3,
                     label="self-distillation steps (answer KL)")
        ax_loss.legend()
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_ppl.plot([0] + [e["step"] for e in card["evals"]],
                [card["perplexity_before"]] + [e["perplexity"] for e in card["evals"]], marker="o", label="recovered")
    ax_ppl.axhline(base_ppl, color="gray", ls="--", label=f"original ({base_depth} blocks, geo-mean)")
    ax_ppl.set(xlabel="step", ylabel="held-out perplexity", title="held-out perplexity, training domains")
    ax_ppl.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:.0f} s")
