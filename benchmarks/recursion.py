"""Recursive transformers on a truncated SmolLM2: standard vs vanilla recursion vs RecursiveVLM.

One command:
    .venv/bin/python benchmarks/recursion.py   # defaults: 4 layers, R = 3, 16 steps x 2 x 64 tokens each

The defaults fit a shared 2-core CPU (about 11 minutes); raise --layers/--steps/--seq-len for a
stronger comparison.

Three variants start from the SAME truncated pretrained model (first `--layers` blocks + final
norm + head), train the SAME decoder blocks on the SAME `austen` calib blocks in the same order
for the same number of optimizer steps:
  - standard:       R = 1, plain next-token loss;
  - vanilla:        whole decoder looped R times, last hidden state fed back, last-step loss;
  - recursivevlm:   Recursive Connector between steps + Monotonic Recursion Loss (beta 2).
Then held-out perplexity (`austen:persuasion`, heldout split) at every step 1..R, and early exit
of the RecursiveVLM model decoded token by token at several KL thresholds (loops saved vs ppl).
Writes benchmarks/results/recursion.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from depthkit.data import DataSpec, token_blocks, token_stream  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recursive import RecursiveModel, truncate_layers  # noqa: E402
from depthkit.recursive.generate import early_exit_nll  # noqa: E402
from depthkit.recursive.train import TrainSettings, step_perplexities, train  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layers", type=int, default=4, help="keep the first N blocks of the model")
    p.add_argument("--loops", type=int, default=3, help="recursion steps R of the recursive variants")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per variant (the shared budget)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--connector-lr", type=float, default=5e-3)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--exit-tokens", type=int, default=64, help="held-out tokens decoded per early-exit threshold")
    p.add_argument("--thresholds", default="5e-4,5e-3,5e-2,2e-1", help="comma-separated KL thresholds")
    p.add_argument("--variants", default="standard,vanilla,recursivevlm")
    p.add_argument("--out", default=str(RESULTS / "recursion"), help="path prefix of the .json/.md/.png results")
    return p.parse_args(argv)


VARIANTS = {
    "standard": dict(loops=1, feedback="vanilla", loss="last"),
    "vanilla": dict(feedback="vanilla", loss="last"),
    "recursivevlm": dict(feedback="connector", loss="monotonic"),
}


def build(args: argparse.Namespace, feedback: str) -> RecursiveModel:
    base, _ = load_model(args.model, dtype="float32")
    truncate_layers(base, args.layers)
    return RecursiveModel.wrap(base, num_loops=args.loops, feedback=feedback, connector_k=min(4, args.layers))


def run_variant(name: str, args, train_ids, eval_ids) -> tuple[RecursiveModel, dict]:
    spec = VARIANTS[name]
    loops = spec.get("loops", args.loops)
    model = build(args, spec["feedback"])
    before = step_perplexities(model, eval_ids, loops)
    trainable = ("connector", "layers") if spec["feedback"] == "connector" else ("layers",)
    settings = TrainSettings(steps=args.steps, loops=loops, batch_size=args.batch_size, lr=args.lr,
                             connector_lr=args.connector_lr, loss=spec["loss"], trainable=trainable,
                             eval_every=max(1, args.steps), warmup_steps=max(1, args.steps // 10))
    began = time.perf_counter()
    result = train(model, train_ids, None, settings)
    seconds = time.perf_counter() - began
    after = step_perplexities(model, eval_ids, loops)
    print(f"{name}: held-out ppl per step before {fmt(before)} after {fmt(after)} ({seconds:.0f} s)")
    return model, {"variant": name, "loops": loops, "loss": spec["loss"], "feedback": spec["feedback"],
                   "train_seconds": seconds, "ppl_before": before, "ppl_after": after,
                   "trainable_parameters": result.trainable_parameters,
                   "final_train_loss": result.history[-1]["loss"] if result.history else None}


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def early_exit_sweep(model: RecursiveModel, stream, args) -> list[dict]:
    rows = []
    reference = None
    for threshold in [None, *(float(t) for t in args.thresholds.split(","))]:
        nll, loops = early_exit_nll(model, stream, args.loops, threshold, window=args.exit_tokens, max_windows=1)
        ppl = math.exp(nll)
        reference = reference or ppl
        rows.append({"threshold": threshold, "perplexity": ppl, "ppl_cost_pct": 100 * (ppl / reference - 1),
                     **loops.to_dict()})
        print(f"early exit threshold {threshold}: ppl {ppl:.3f}, loops saved {100 * loops.saved_fraction:.1f}%")
    return rows


def plot(variants: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        steps = list(range(1, len(v["ppl_after"]) + 1))
        if len(steps) == 1:
            ax.axhline(v["ppl_after"][0], linestyle="--", color="gray", label=f"{v['variant']} (R=1)")
        else:
            ax.plot(steps, v["ppl_after"], marker="o", label=v["variant"])
    ax.set_xlabel("recursion step")
    ax.set_ylabel("held-out perplexity (austen:persuasion)")
    ax.set_yscale("log")
    ax.set_title("Per-step held-out perplexity after equal-budget training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    rows = [{"variant": v["variant"], "R": v["loops"], "loss": v["loss"],
             **{f"ppl step {i + 1}": p for i, p in enumerate(v["ppl_after"])},
             "ppl before training (last step)": v["ppl_before"][-1], "train s": v["train_seconds"]}
            for v in result["variants"]]
    columns = ["variant", "R", "loss"] + [f"ppl step {i + 1}" for i in range(result["settings"]["loops"])]
    columns += ["ppl before training (last step)", "train s"]
    lines = ["# Recursive transformers: standard vs vanilla vs RecursiveVLM", "",
             f"Model: {result['settings']['model']} truncated to {result['settings']['layers']} layers; "
             f"{result['settings']['steps']} steps x {result['settings']['batch_size']} x "
             f"{result['settings']['seq_len']} tokens of austen (calib) per variant; held-out: austen:persuasion.", "",
             format_table(rows, columns), ""]
    for check, ok in result["checks"].items():
        lines.append(f"- {check}: **{'yes' if ok else 'no'}**")
    if result.get("early_exit"):
        lines += ["", "## Early exit (RecursiveVLM model, token-by-token decoding with KV reuse)", "",
                  format_table([{"KL threshold": r["threshold"] if r["threshold"] is not None else "none (all R)",
                                 "ppl": r["perplexity"], "ppl cost %": r["ppl_cost_pct"],
                                 "mean steps": r["mean_steps"], "loops saved %": 100 * r["loops_saved"]}
                                for r in result["early_exit"]])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    _, tokenizer = load_model(args.model, dtype="float32")
    train_ids = token_blocks(tokenizer, DataSpec("austen", "calib"), args.steps * args.batch_size, args.seq_len)
    heldout = DataSpec("austen:persuasion", "heldout")
    eval_ids = token_blocks(tokenizer, heldout, args.eval_blocks, args.seq_len)
    variants, models = [], {}
    for name in args.variants.split(","):
        models[name], summary = run_variant(name, args, train_ids, eval_ids)
        variants.append(summary)
    by_name = {v["variant"]: v for v in variants}
    checks = {}
    if "recursivevlm" in by_name:
        ppl = by_name["recursivevlm"]["ppl_after"]
        checks["RecursiveVLM held-out ppl improves at every step 1..R"] = all(b < a for a, b in zip(ppl, ppl[1:]))
        if "standard" in by_name:
            checks["RecursiveVLM last step beats the standard model"] = ppl[-1] < by_name["standard"]["ppl_after"][0]
        if "vanilla" in by_name:
            checks["RecursiveVLM last step beats vanilla recursion"] = ppl[-1] < by_name["vanilla"]["ppl_after"][-1]
    early = []
    if "recursivevlm" in models and args.exit_tokens > 0:
        early = early_exit_sweep(models["recursivevlm"], token_stream(tokenizer, heldout), args)
        good = [r for r in early[1:] if r["loops_saved"] >= 0.30 and r["ppl_cost_pct"] < 2.0]
        checks["early exit saves >= 30% of loops at < 2% ppl cost (some threshold)"] = bool(good)
    result = {"settings": vars(args), "variants": variants, "early_exit": early, "checks": checks,
              "seconds": time.perf_counter() - began}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    plot(variants, out.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')}, .md, .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
