"""Relaxed Recursive Transformers on the default model: how much of the pretrained model survives the
conversion to K shared layers, and how much a short uptraining brings back, against the original
model trained with the same budget.

One command (`python benchmarks/relaxed.py`): SmolLM2-135M-Instruct's 30 layers become --shared K = 10
layers looped N/K = 3 times (CYCLE sharing and Stepwise initialisation by default). For every LoRA
rank in --ranks (0: strict sharing; r > 0: a LoRA per shared layer and loop, started from the
truncated SVD of the original layer's difference to its shared layer; the layers' rank caps r at
192, SmolLM2's key/value width), the held-out perplexity right after conversion and after --steps
optimizer steps on the same batches, in the same order, as the original model (R = 1) fine-tuned
with the same budget. Only the last step is scored: intermediate steps of a converted model are
halfway through the original stack, not predictions. Writes benchmarks/results/relaxed.{json,md,png}.

The recorded run (the defaults: 300 steps x 4 x 128 tokens, ranks 0, 64, 192, bf16 autocast, 2-core
AVX512-BF16 CPU) took 67 min: 2.3-2.5 s per step for the original and strict sharing (30 layer
applications each), 2.9-3.4 s with per-loop LoRA; the rank-64 variant's recorded 4.8 s/step
shared the CPU with the test suite for part of its run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from recursion import benchmark_data  # noqa: E402

from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recursive import RecursiveModel  # noqa: E402
from depthkit.recursive.relaxed import INITS, LOOP_NORMS, SHARINGS, relax  # noqa: E402
from depthkit.recursive.train import RecursiveTrainSettings, step_perplexities, train  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.utils.precision import MIXED_PRECISIONS, resolve_mixed_precision  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORIGINAL = "original (R = 1)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--shared", type=int, default=10, help="K: shared layers the model is converted to")
    p.add_argument("--sharing", default="cycle", choices=SHARINGS)
    p.add_argument("--init", default="stepwise", choices=INITS)
    p.add_argument("--loop-norms", default="shared", choices=LOOP_NORMS,
                   help="per-loop norms from the shared layer (the method) or the original layers (flagged)")
    p.add_argument("--ranks", default="0,64,192", help="comma-separated per-loop LoRA ranks (0: strict sharing)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant (the shared budget)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks of --seq-len tokens")
    p.add_argument("--eval-every", type=int, default=50,
                   help="held-out perplexity every N optimizer steps (a learning curve; 0: at the end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISIONS)
    p.add_argument("--out", default=str(RESULTS / "relaxed"), help="path prefix of the .json/.md/.png results")
    args = p.parse_args(argv)
    args.data = "interleaved"  # the six novels in turn, as benchmarks/recursion.py trains
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision)
    return args


def build(args: argparse.Namespace, rank: int | None) -> RecursiveModel:
    """The original model as a one-step recursive model (rank None), or its relaxed conversion."""
    base, _ = load_model(args.model, dtype="float32")
    if rank is None:
        return RecursiveModel.wrap(base, num_loops=1, feedback="vanilla")
    return relax(base, args.shared, args.sharing, args.init, rank, args.seed, args.loop_norms)


def run_variant(name: str, rank: int | None, args: argparse.Namespace, train_ids, eval_ids) -> dict:
    model = build(args, rank)
    loops = model.config.num_loops
    before = step_perplexities(model, eval_ids, loops)[-1]
    trainable = ("layers", "loop_lora") if rank else ("layers",)
    settings = RecursiveTrainSettings(
        steps=args.steps, loops=loops, batch_size=args.batch_size, lr=args.lr, loss="last", trainable=trainable,
        eval_every=args.eval_every or max(1, args.steps), warmup_steps=max(1, args.steps // 10),
        mixed_precision=args.mixed_precision, seed=args.seed)
    result = train(model, train_ids, eval_ids if args.eval_every else None, settings)
    after = step_perplexities(model, eval_ids, loops)[-1]
    print(f"{name}: held-out ppl {before:.4g} -> {after:.4g} ({result.seconds:.0f} s)", flush=True)
    return {"variant": name, "rank": rank, "loops": loops, "layers": len(model.layers),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": result.trainable_parameters, "ppl_before": before, "ppl_after": after,
            "seconds_per_step": result.seconds / max(1, args.steps),
            "curve": [{"step": e["step"], "perplexity": e["perplexity"][-1]} for e in result.evaluations]}


ORIGINAL_NORMS_FLAG = " (FLAGGED: better than the method, which starts them from the shared layer)"


def markdown(result: dict) -> str:
    s = result["settings"]
    original = next(v for v in result["variants"] if v["rank"] is None)
    rows = [{"variant": v["variant"], "layers x loops": f"{v['layers']} x {v['loops']}",
             "parameters (M)": v["parameters"] / 1e6, "trained (M)": v["trainable_parameters"] / 1e6,
             "ppl after conversion": v["ppl_before"], "ppl after uptraining": v["ppl_after"],
             "vs original trained %": 100 * (v["ppl_after"] / original["ppl_after"] - 1),
             "s/step": v["seconds_per_step"]} for v in result["variants"]]
    return "\n".join([
        "# Relaxed Recursive Transformers: conversion and uptraining", "",
        f"Model: {s['model']}, converted to {s['shared']} shared layers ({s['sharing'].upper()} sharing, "
        f"{s['init']} initialisation, per-loop norms from the {s.get('loop_norms', 'original')} layers"
        f"{'' if s.get('loop_norms') == 'shared' else ORIGINAL_NORMS_FLAG}"
        f"); per variant {s['steps']} AdamW steps x {s['batch_size']} x {s['seq_len']} "
        f"tokens of the six Austen novels' calib splits (same blocks, same order), lr {s['lr']:g}, cosine schedule, "
        f"{s['mixed_precision']} autocast, embeddings/head frozen; the original model trains its layers, the "
        "converted ones their shared layers and per-loop LoRA. Held-out: "
        f"{s['eval_blocks']} x {s['seq_len']} tokens of the novels' heldout splits, last step. "
        f"Total {result['seconds'] / 60:.0f} min.", "",
        format_table(rows), *curve_markdown(result["variants"])]) + "\n"


def curve_markdown(variants: list[dict]) -> list[str]:
    """Held-out perplexity of every variant at each evaluation during uptraining: is the gap closing?"""
    if not variants[0]["curve"]:
        return []
    rows = [{"optimizer step": point["step"], **{v["variant"]: v["curve"][i]["perplexity"] for v in variants}}
            for i, point in enumerate(variants[0]["curve"])]
    return ["", "## During uptraining (held-out perplexity, last step; cosine schedule over the whole budget)", "",
            format_table(rows), ""]


def plot(result: dict, path: Path) -> None:
    variants = result["variants"]
    curves = bool(variants[0]["curve"])
    fig, axes = plt.subplots(1, 1 + curves, figsize=(7 + 5 * curves, 4), squeeze=False)
    ax = axes[0][0]
    positions = range(len(variants))
    ax.bar([p - 0.2 for p in positions], [v["ppl_before"] for v in variants], 0.4, label="after conversion")
    ax.bar([p + 0.2 for p in positions], [v["ppl_after"] for v in variants], 0.4, label="after uptraining")
    ax.set_yscale("log")
    ax.set_xticks(list(positions), [v["variant"] for v in variants], fontsize=8)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"Relaxed recursive conversion, {result['settings']['steps']} steps of uptraining")
    ax.legend(fontsize=8)
    if curves:
        ax = axes[0][1]
        for v in variants:
            ax.plot([c["step"] for c in v["curve"]], [c["perplexity"] for c in v["curve"]], marker="o",
                    label=v["variant"])
        ax.set(yscale="log", xlabel="optimizer step", ylabel="held-out perplexity (log)", title="During uptraining")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save(result: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began, out = time.perf_counter(), Path(args.out)
    _, tokenizer = load_model(args.model, dtype="float32")
    train_ids, eval_ids = benchmark_data(tokenizer, args)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    variants = [(ORIGINAL, None)] + [(f"K = {args.shared}, rank {r}" if r else f"K = {args.shared}, strict", r)
                                     for r in ranks]
    result = {"settings": vars(args), "variants": [], "seconds": 0.0}
    for name, rank in variants:
        torch.manual_seed(args.seed)
        result["variants"].append(run_variant(name, rank, args, train_ids, eval_ids))
        result["seconds"] = time.perf_counter() - began
        save(result, out)  # a crash later keeps what was measured
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')}, .md, .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
