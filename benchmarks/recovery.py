"""Recovery fine-tuning of a 24-block SmolLM2 for a short CPU budget: held-out perplexity before/after.

    .venv/bin/python benchmarks/recovery.py                      # 200 steps x 1 x 512 tokens, LoRA rank 8
    .venv/bin/python benchmarks/recovery.py --model runs/flat24 --name recovery_flatten   # a compressed checkpoint
    .venv/bin/python benchmarks/recovery.py --steps 20 --quick    # smoke run

Compressed model: `--model PATH`, or (default) the 30-block SmolLM2-135M-Instruct with the 6 blocks of
lowest block influence removed (ShortGPT; influence on 8 x 256 tokens of Emma, calib split).
Training text: Mansfield Park (calib split). Held-out: 20 x 512 tokens of Persuasion (heldout
split), the same slice as the method comparison, so the figures line up with
benchmarks/results/compare_methods.md. The original 30-block model is measured on the same slice.
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
from depthkit.data import DataSpec, token_blocks, token_stream  # noqa: E402
from depthkit.evaluate.perplexity import perplexity  # noqa: E402
from depthkit.models.adapters import get_adapter  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recover import RecoverySettings, recover  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SELECT = DataSpec("austen:emma", "calib")
TRAIN = DataSpec("austen:mansfieldpark", "calib")
HELDOUT = DataSpec("austen:persuasion", "heldout")
# Training on Austen also adapts the model to Austen's style; a different author shows how much
# of the gain is general repair of the compressed model rather than domain adaptation.
OTHER = DataSpec("shakespeare:hamlet", "all")  # never trained on: any slice is out of domain


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a compressed checkpoint (default: ShortGPT 30 -> 24)")
    parser.add_argument("--original", default=DEFAULT_MODEL)
    parser.add_argument("--remove", type=int, default=6, help="blocks removed when building the default model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=20, help="held-out windows of --seq-len tokens")
    parser.add_argument("--distill-weight", type=float, default=0.0, help="> 0: distil from the original")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids spin-wait collapse on a CPU shared with other jobs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 held-out windows, results *_quick")
    parser.add_argument("--name", default="recovery", help="results file prefix (e.g. recovery_flatten)")
    return parser.parse_args()


def shortgpt_model(original: str, remove: int):
    """The original with its `remove` lowest block-influence blocks dropped (and which ones)."""
    model, tokenizer = load_model(original)
    report = analyze_redundancy(model, token_blocks(tokenizer, SELECT, 8, 256), progress=False)
    dropped = report.lowest_influence(remove)
    adapter = get_adapter(model)
    adapter.set_layers(model, [layer for i, layer in enumerate(adapter.layers(model)) if i not in dropped])
    return model, tokenizer, dropped


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    windows = 4 if args.quick else args.eval_windows
    settings = RecoverySettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                lora_rank=args.lora_rank, eval_every=args.eval_every,
                                eval_tokens=windows * args.seq_len, save_every=max(args.steps, 1),
                                distill_weight=args.distill_weight)
    original, tokenizer = load_model(args.original)
    heldout, other = token_stream(tokenizer, HELDOUT), token_stream(tokenizer, OTHER)

    def other_ppl(model) -> float:
        return perplexity(model, other, window=args.seq_len, max_tokens=settings.eval_tokens, progress=False).perplexity

    base = perplexity(original, heldout, window=args.seq_len, max_tokens=settings.eval_tokens, progress=False)
    base_depth = original.config.num_hidden_layers
    others = {"original": other_ppl(original)}
    if args.model:
        model, tokenizer = load_model(args.model)
        source, dropped = args.model, None
    else:
        model, tokenizer, dropped = shortgpt_model(args.original, args.remove)
        source = f"{args.original} minus blocks {dropped} (ShortGPT)"
    others["before"] = other_ppl(model)
    teacher = original if args.distill_weight > 0 else None
    if teacher is None:
        del original
    with tempfile.TemporaryDirectory() as out:
        card = recover(model, tokenizer, token_stream(tokenizer, TRAIN), heldout, settings, out, teacher=teacher,
                       meta={"model": source, "data": TRAIN.describe(), "eval_data": HELDOUT.describe()})
        others["after"] = other_ppl(load_model(str(Path(out) / "model"))[0])
    card["other_perplexity"] = others
    write_results(args, card, (base.perplexity, base_depth), source, dropped, model.config.num_hidden_layers)


def write_results(args, card, base: tuple[float, int], source: str, dropped, depth: int) -> None:
    base_ppl, base_depth = base
    suffix = "_quick" if args.quick else ""
    stem = f"{args.name}{suffix}"
    others = card["other_perplexity"]
    other_column = f"{OTHER.corpus} ppl"
    rows = [
        {"model": f"original ({args.original})", "blocks": base_depth, "held-out ppl": base_ppl,
         other_column: others["original"], "train s": 0.0},
        {"model": "compressed, before recovery", "blocks": depth, "held-out ppl": card["perplexity_before"],
         other_column: others["before"], "train s": 0.0},
        {"model": f"after LoRA recovery ({card['steps']} steps)", "blocks": depth,
         "held-out ppl": card["perplexity_after"], other_column: others["after"], "train s": card["seconds"]},
    ]
    result = {
        "model": source, "dropped_blocks": dropped, "original_perplexity": base_ppl,
        "perplexity_before": card["perplexity_before"], "perplexity_after": card["perplexity_after"],
        "gap_closed": (card["perplexity_before"] - card["perplexity_after"]) / (card["perplexity_before"] - base_ppl),
        "train_data": TRAIN.describe(), "heldout_data": HELDOUT.describe(),
        "other_data": OTHER.describe(), "other_perplexity": others,
        "tokens_trained": card["tokens_trained"], "trainable_parameters": card["trainable_parameters"],
        "seconds": card["seconds"], "settings": card["settings"], "evals": card["evals"],
        "losses": [{k: entry[k] for k in ("step", "loss")} for entry in card["losses"]],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", result)
    table = format_table(rows)
    curve = format_table([{"step": 0, "held-out ppl": card["perplexity_before"]},
                          *({"step": e["step"], "held-out ppl": e["perplexity"]} for e in card["evals"])])
    (RESULTS / f"{stem}.md").write_text(
        f"# Recovery fine-tuning ({source})\n\n"
        f"LoRA rank {args.lora_rank} on q/k/v/o/gate/up/down of every block, {card['steps']} steps x "
        f"{args.batch_size} x {args.seq_len} tokens of {TRAIN.describe()} ({card['tokens_trained']} tokens, "
        f"lr {args.lr}, distill weight {args.distill_weight}), bf16 base with fp32 adapters on CPU. "
        f"Held-out: {card['settings']['eval_tokens']} tokens of {HELDOUT.describe()} "
        f"in {args.seq_len}-token windows; the same number of tokens of {OTHER.describe()} (another author) "
        "separates general repair from adaptation to Austen's style.\n\n"
        f"{table}\n\nRecovery closed {100 * result['gap_closed']:.1f}% of the gap to the original.\n\n"
        f"Held-out perplexity during training:\n\n{curve}\n\n![curve]({stem}.png)\n")
    plot_curve(card, base, RESULTS / f"{stem}.png")
    print(table)


def plot_curve(card, base: tuple[float, int], path: Path) -> None:
    base_ppl, base_depth = base
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [e["step"] for e in card["losses"]]
    ax_loss.plot(steps, [e["loss"] for e in card["losses"]], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_ppl.plot([0] + [e["step"] for e in card["evals"]],
                [card["perplexity_before"]] + [e["perplexity"] for e in card["evals"]], marker="o", label="recovered")
    ax_ppl.axhline(base_ppl, color="gray", ls="--", label=f"original ({base_depth} blocks)")
    ax_ppl.set(xlabel="step", ylabel="held-out perplexity", title="held-out perplexity")
    ax_ppl.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:.0f} s")
