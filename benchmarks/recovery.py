"""Recovery fine-tuning of a 24-block SmolLM2 for a short CPU budget: perplexity before/after, in and out of domain.

    .venv/bin/python benchmarks/recovery.py                      # 200 steps x 1 x 512 tokens, LoRA rank 8
    .venv/bin/python benchmarks/recovery.py --model runs/flat24 --name recovery_flatten   # a compressed checkpoint
    .venv/bin/python benchmarks/recovery.py --steps 20 --quick    # smoke run

Compressed model: `--model PATH`, or (default) the 30-block SmolLM2-135M-Instruct with the 6 blocks of
lowest block influence removed (ShortGPT; influence on 8 x 256 tokens of the training text).
Training text: `--train-data` (default: every offline domain but source code, sampled over the calib
splits), so that the one domain left out shows whether recovery repairs the model or only adapts it
to what it was trained on. Held-out: `--eval-windows` x 512 tokens sampled over the heldout split of
EVERY domain; the original is measured on the same blocks. In domain / out of domain: geometric mean
of perplexity over the domains in / not in the training text.
Writes benchmarks/results/<name>.{json,md,png} (`--name`, default `recovery`; `_quick` suffix for --quick).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from depthkit.analysis.redundancy import analyze_redundancy  # noqa: E402
from depthkit.data import DataSpec  # noqa: E402
from depthkit.data.blocks import sample_blocks  # noqa: E402
from depthkit.data.corpora import MIX_COMPONENTS, mixture_sources  # noqa: E402
from depthkit.evaluate.perplexity import perplexity  # noqa: E402
from depthkit.evaluate.report import geo_mean  # noqa: E402
from depthkit.models.adapters import get_adapter  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recover import RecoverySettings, recover  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEFT_OUT = "pycode"  # never trained on by default: the out-of-domain check
TRAIN_DEFAULT = "+".join(d for d in MIX_COMPONENTS if d != LEFT_OUT)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a compressed checkpoint (default: ShortGPT 30 -> 24)")
    parser.add_argument("--original", default=DEFAULT_MODEL)
    parser.add_argument("--remove", type=int, default=6, help="blocks removed when building the default model")
    parser.add_argument("--train-data", default=TRAIN_DEFAULT, help=f"training corpus (default {TRAIN_DEFAULT})")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len tokens per domain")
    parser.add_argument("--distill-weight", type=float, default=0.0, help="> 0: distil from the original")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids spin-wait collapse on a CPU shared with other jobs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 held-out windows per domain, *_quick")
    parser.add_argument("--name", default="recovery", help="results file prefix (e.g. recovery_flatten)")
    return parser.parse_args()


def shortgpt_model(original: str, remove: int, select: DataSpec):
    """The original with its `remove` lowest block-influence blocks dropped (and which ones)."""
    model, tokenizer = load_model(original)
    report = analyze_redundancy(model, sample_blocks(tokenizer, select, 8, 256), progress=False)
    dropped = report.lowest_influence(remove)
    adapter = get_adapter(model)
    adapter.set_layers(model, [layer for i, layer in enumerate(adapter.layers(model)) if i not in dropped])
    return model, tokenizer, dropped


def domain_perplexities(model, heldout: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {d: perplexity(model, stream, window=seq_len, progress=False).perplexity for d, stream in heldout.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    windows = 2 if args.quick else args.eval_windows
    train = DataSpec(args.train_data, "calib")
    trained_on = mixture_sources(args.train_data)
    settings = RecoverySettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                lora_rank=args.lora_rank, eval_every=args.eval_every,
                                eval_tokens=windows * args.seq_len * len(trained_on), checkpoint_every=0,
                                distill_weight=args.distill_weight)
    original, tokenizer = load_model(args.original)
    heldout = {d: sample_blocks(tokenizer, DataSpec(d, "heldout"), windows, args.seq_len).flatten()
               for d in MIX_COMPONENTS}
    # What the trainer scores during training: the held-out text of the training domains.
    train_heldout = torch.cat([heldout[d] for d in MIX_COMPONENTS if d in trained_on])
    ppl = {"original": domain_perplexities(original, heldout, args.seq_len)}
    base_depth = original.config.num_hidden_layers
    if args.model:
        model, tokenizer = load_model(args.model)
        source, dropped = args.model, None
    else:
        model, tokenizer, dropped = shortgpt_model(args.original, args.remove, train)
        source = f"{args.original} minus blocks {dropped} (ShortGPT)"
    ppl["before"] = domain_perplexities(model, heldout, args.seq_len)
    teacher = original if args.distill_weight > 0 else None
    if teacher is None:
        del original
    blocks = settings.steps * settings.batch_size
    with tempfile.TemporaryDirectory() as out:
        card = recover(model, tokenizer, sample_blocks(tokenizer, train, blocks, args.seq_len).flatten(),
                       train_heldout, settings, out, teacher=teacher,
                       meta={"model": source, "data": train.describe(), "eval_data": "heldout of the training domains"})
        ppl["after"] = domain_perplexities(load_model(str(Path(out) / "model"))[0], heldout, args.seq_len)
    write_results(args, card, ppl, trained_on, base_depth, source, dropped, model.config.num_hidden_layers)


def write_results(args, card, ppl: dict[str, dict[str, float]], trained_on: list[str], base_depth: int,
                  source: str, dropped, depth: int) -> None:
    stem = f"{args.name}{'_quick' if args.quick else ''}"

    def row(label: str, key: str, blocks: int, seconds: float) -> dict:
        values = ppl[key]
        inside = [values[d] for d in values if d in trained_on]
        outside = [values[d] for d in values if d not in trained_on]
        return {"model": label, "blocks": blocks, **{f"{d} ppl": v for d, v in values.items()},
                "in-domain (geo-mean)": geo_mean(inside), "out-of-domain (geo-mean)": geo_mean(outside),
                "train s": seconds}

    rows = [row(f"original ({args.original})", "original", base_depth, 0.0),
            row("compressed, before recovery", "before", depth, 0.0),
            row(f"after LoRA recovery ({card['steps']} steps)", "after", depth, card["seconds"])]

    def gap(column: str) -> float | None:
        base, before, after = (r[column] for r in rows)
        return (before - after) / (before - base) if None not in (base, before, after) and before != base else None

    result = {
        "model": source, "dropped_blocks": dropped, "train_data": DataSpec(args.train_data, "calib").describe(),
        "trained_domains": trained_on, "heldout": f"{card['settings']['eval_tokens'] // len(trained_on)} tokens "
        "sampled over each domain's heldout split", "perplexity": ppl,
        "gap_closed": {"in_domain": gap("in-domain (geo-mean)"), "out_of_domain": gap("out-of-domain (geo-mean)")},
        "tokens_trained": card["tokens_trained"], "trainable_parameters": card["trainable_parameters"],
        "seconds": card["seconds"], "settings": card["settings"], "evals": card["evals"],
        "losses": [{k: entry[k] for k in ("step", "loss")} for entry in card["losses"]],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", result)
    table = format_table(rows)
    curve = format_table([{"step": 0, "training domains' held-out ppl": card["perplexity_before"]},
                          *({"step": e["step"], "training domains' held-out ppl": e["perplexity"]}
                            for e in card["evals"])])
    closed = result["gap_closed"]
    (RESULTS / f"{stem}.md").write_text(
        f"# Recovery fine-tuning ({source})\n\n"
        f"LoRA rank {args.lora_rank} on q/k/v/o/gate/up/down of every block, {card['steps']} steps x "
        f"{args.batch_size} x {args.seq_len} tokens sampled over {result['train_data']} ({card['tokens_trained']} "
        f"tokens, lr {args.lr}, distill weight {args.distill_weight}). Held-out: {result['heldout']}; "
        f"in domain = {', '.join(trained_on)}, out of domain = the rest.\n\n{table}\n\n"
        f"Recovery closed {_pct(closed['in_domain'])} of the gap to the original in domain and "
        f"{_pct(closed['out_of_domain'])} out of domain.\n\n"
        f"Held-out perplexity during training:\n\n{curve}\n\n![curve]({stem}.png)\n")
    plot_curve(card, rows[0]["in-domain (geo-mean)"], base_depth, RESULTS / f"{stem}.png")
    print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot_curve(card, base_ppl: float, base_depth: int, path: Path) -> None:
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [e["step"] for e in card["losses"]]
    ax_loss.plot(steps, [e["loss"] for e in card["losses"]], lw=0.8)
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
