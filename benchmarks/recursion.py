"""Recursive transformers on the pretrained SmolLM2: standard vs vanilla recursion vs RecursiveVLM.

One command (the defaults are the setting behind benchmarks/results/recursion.*, seed 0; the
four-seed summary benchmarks/results/recursion_seeds.* adds `--seeds 0,1,2,3`):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recursion.py

About 55 minutes a seed on one thread of the shared 2-core CPU (AVX-512 with bf16, bf16 autocast),
two seeds at a time (measured 2026-12-02): training takes 1.4-1.6 s/step for the standard model,
2.6-2.8 s/step for vanilla and 4.9-5.5 s/step for RecursiveVLM at R = 4 (8 + 13 + 26 minutes; every
step's logits pay the 49k-word LM head and cross-entropy), held-out evaluation a minute, and the
early-exit sweep decodes 9 x 255 held-out tokens one at a time (a few minutes). `--seeds 0,1,2,3`,
the recorded setting, is four of these (two jobs of two seeds: about two hours). On a CPU without
native bf16 (AVX2 only) `--mixed-precision auto` trains in float32, about 4x slower a step (measured
before 2026-12-02: 2.95 s standard, 12.3 s RecursiveVLM), so a few hours a seed.
On Gemma 3 270M (`--model gemma3-270m --out benchmarks/results/recursion_gemma3`) a seed took 76
minutes on two threads (2026-12-04): 2.2 s/step standard and vanilla, 9.0 s/step RecursiveVLM, whose
monotonic loss pays the 262k-word LM head at every step.
`--steps 2 --eval-blocks 2 --exit-tokens 12` is a two-minute smoke run. `--eval-every N` adds a
learning curve: held-out perplexity of every step every N optimizer steps
(benchmarks/results/recursion_options/learning_curve_seed0.*, an earlier setting).

Why 6 of SmolLM2's 30 layers: recursion pays when the unique layers are too few for the task,
which is the regime looped models are for (the same parameters, more compute). Which 6: evenly
spaced ones (`--pick stepwise`: layers 0, 6, 12, 17, 23, 29, the Stepwise rule of Relaxed Recursive
Transformers), so the last block, whose features the final norm and head expect, stays. The
truncated model starts broken all the same (held-out perplexity ~8e6), so every variant first has
to heal, and they all heal from the same start with the same budget: the comparison is how much
the loops add at equal parameters. The first 6 layers (`--pick first`, ~4e7 at the start) heal
worse for every variant, and there the looped model stayed 2.2% behind the standard one (kept in
benchmarks/results/recursion_options/pick_first.*, measured with the embedding-sized connector).
Looping the intact 30-layer model instead (`--layers 0`, benchmarks/results/recursion_full_depth.*)
left nothing for later loops to add in a CPU-sized budget: a single pass is already what the model
was pretrained for, training there turned the connector off and steps 2..R copied step 1.

What loops: the middle 4 of the 6 kept layers (`--ends 1`). Layer 0 runs once before the loop (a
prelude) and layer 29 once after every decoded step (a coda), as in Huginn's prelude / recurrent
core / coda and the MIDDLE sharing of Relaxed Recursive Transformers: the loop feeds hidden
states back into mid-stack layers, and the layers that read embeddings or write for the LM head
keep their one job. At R = 1 this is the same computation as the plain model, so the standard
variant does not change. `--ends 0` loops all 6 kept layers (four seeds of it, embedding-sized
connector: benchmarks/results/recursion_options/interleaved_whole_loop_seeds.*).

Three variants start from the SAME pretrained model and train the SAME decoder weights (plus the
connector where there is one) on the SAME `austen` calib blocks in the same order, with the same
optimizer, learning rate schedule and number of optimizer steps (the shared budget). The blocks
are taken in turn from all six novels (`--data interleaved`), and held-out perplexity is measured
on the six novels' heldout splits (the last 20% of each book, never trained on), so the held-out
text comes from the distribution trained on. `--data first` is the earlier setting: the first
calib blocks, which are all from the start of Emma, evaluated on Persuasion's heldout split, which
also measures how a lead won on one book carries over to another (four seeds of it, whole loop:
benchmarks/results/recursion_options/data_first_seeds.*). The variants:
  - standard:       R = 1, plain next-token loss (so 1/R of the compute of the recursive ones);
  - vanilla:        the (truncated) decoder looped R times, last hidden state fed back, last-step loss;
  - connector_mrl:  Recursive Connector between steps + Monotonic Recursion Loss (beta 2); the
                    connector adds onto the previous step's input (`--residual previous`) with its
                    scale starting at 0.1 (`--scale-init`). Onto the embeddings (the library
                    default), every step restarts from the embeddings plus a hint, and the loop
                    settles after one feedback (measured: steps 2-4 within 0.2% of each other);
                    onto the previous input, each step refines the last one. The update is sized
                    by the RMS of that input, token by token (`--connector-norm residual`), so scale
                    0.1 moves it by about 10%. Sized by the embeddings' RMS instead (the runs before
                    2026-12-02, benchmarks/results/recursion_options/embedding_gain_seeds.*), it was
                    14x smaller than meant behind the prelude (hidden RMS ~1.9 after layer 0 against
                    0.14 for the embeddings): the loop added 0.1% from step 1 to step 4 and the last
                    step only tied the standard model;
  - vanilla_monotonic (not in the default set): vanilla feedback with the monotonic loss.
Embeddings and LM head stay frozen (tied weights: training them would change the input space the
connector adds onto). Held-out perplexity is measured at every step 1..R before and after training.
`--loop-lora R` adds a per-loop LoRA (Relaxed Recursive Transformers' relaxation, zero start) to
every looped variant. `--seed N` changes the batch order and the new weights' start. One seed's
margins can be smaller than the seed-to-seed spread, so `--seeds 0,1,2,3` runs the benchmark once
per seed (benchmarks/results/recursion_seeds/seed<N>.*, reused when the settings match, so seeds
can run as separate jobs) and sums them up as paired differences against the standard model of
the same seed: benchmarks/results/recursion_seeds.{json,md,png}.

Early exit (Huginn-style KL between consecutive steps' next-token distributions) is measured on
the RecursiveVLM model by decoding held-out text (Persuasion's heldout split) token by token with
the KV cache (skipped steps reuse the exit step's keys/values), at a wide sweep of thresholds. The
KL test needs two distributions, so the earliest exit is after step 2 and the most that can be
saved is 1 - 2/R: R = 4 (the default) leaves room for 50%, R = 3 would cap it at 33%.
Writes benchmarks/results/recursion.{json,md,png} (the JSON also after each variant).
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
import torch  # noqa: E402
from seed_runs import comparable_settings, mean_and_se, parse_seeds, reusable_run  # noqa: E402

from depthkit.data import DataSpec, interleaved_blocks, token_blocks, token_stream  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.recursive import RecursiveModel, truncate_layers  # noqa: E402
from depthkit.recursive.config import CONNECTOR_NORMS, RESIDUALS, default_of  # noqa: E402
from depthkit.recursive.generate import early_exit_nll  # noqa: E402
from depthkit.recursive.model import LAYER_PICKS  # noqa: E402
from depthkit.recursive.train import RecursiveTrainSettings, step_perplexities, train  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.utils.precision import MIXED_PRECISIONS, resolve_mixed_precision  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ZOOM_PCT = 15.0  # top of the plot against the standard model, in percent
SAVE_TARGET, COST_TARGET = 0.30, 2.0  # early exit: >= 30% of loops saved at < 2% perplexity cost
DATA_CHOICES = ("interleaved", "first")
PERSUASION_HELDOUT = DataSpec("austen:persuasion", "heldout")  # early-exit text; `--data first` held-out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layers", type=int, default=6, help="keep only N blocks (0: all), chosen by --pick")
    p.add_argument("--pick", default="stepwise", choices=LAYER_PICKS,
                   help="which --layers blocks to keep: the first ones or evenly spaced ones (last block kept)")
    p.add_argument("--ends", type=int, default=1,
                   help="keep the first and last N kept layers out of the loop (a prelude run once, a coda after "
                        "every step); 0 loops the whole truncated decoder")
    p.add_argument("--loop-lora", type=int, default=0,
                   help="rank of a per-loop LoRA (relaxation) on every looped variant, trained with the layers")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's new weights and the batch order")
    p.add_argument("--seeds", default="",
                   help="comma-separated seeds: run the benchmark once per seed into <out>_seeds/seed<N>.* (reused "
                        "when its settings match) and decide the targets on paired differences over seeds in "
                        "<out>_seeds.{json,md,png}")
    p.add_argument("--loops", type=int, default=4, help="recursion steps R of the recursive variants")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant (the shared budget)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--connector-lr", type=float, default=1e-3)
    p.add_argument("--scale-init", type=float, default=default_of("scale_init"),
                   help="initial connector residual scale (0 makes steps 2..R exact copies of step 1 at the start)")
    p.add_argument("--connector-norm", default=default_of("connector_norm"), choices=CONNECTOR_NORMS,
                   help="what sizes the connector's update: the RMS of the residual it is added onto, token by token, "
                        "or the input embeddings' RMS (the setting of the runs before 2026-12-02)")
    p.add_argument("--connector-gain", type=float, default=None,
                   help="initial RMSNorm gain of every connector tap (default: 1 / k, times the embeddings' RMS with "
                        "--connector-norm embeddings)")
    p.add_argument("--residual", default=default_of("residual"), choices=RESIDUALS,
                   help="what the connector adds onto: the original embeddings or the previous step's input")
    p.add_argument("--deeper", type=int, default=8,
                   help="after training, also evaluate the recursive variants at 1..N steps (any depth at inference)")
    p.add_argument("--data", default="interleaved", choices=DATA_CHOICES,
                   help="interleaved: train on blocks taken in turn from the six novels' calib splits and evaluate "
                        "on their heldout splits; first: the first calib blocks (the start of Emma), evaluated on "
                        "Persuasion's heldout split (the setting before)")
    p.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks of --seq-len tokens")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also measure held-out perplexity every N optimizer steps (a learning curve; 0: at the end)")
    p.add_argument("--exit-tokens", type=int, default=256, help="held-out tokens decoded per early-exit threshold")
    p.add_argument("--thresholds", default="1e-4,1e-3,3e-3,1e-2,3e-2,0.1,0.3,1", help="comma-separated KL thresholds")
    p.add_argument("--variants", default="standard,vanilla,connector_mrl")
    p.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISIONS,
                   help="autocast of training (auto: bf16 where the CPU multiplies it natively, else none)")
    p.add_argument("--out", default=str(RESULTS / "recursion"), help="path prefix of the .json/.md/.png results")
    args = p.parse_args(argv)
    args.seeds = parse_seeds(p, args.seeds) if args.seeds else []
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision)  # recorded as what ran
    return args


VARIANTS = {
    "standard": dict(loops=1, feedback="vanilla", loss="last"),
    "vanilla": dict(feedback="vanilla", loss="last"),
    "connector_mrl": dict(feedback="connector", loss="monotonic"),
    "vanilla_monotonic": dict(feedback="vanilla", loss="monotonic"),  # ablation: the loss without the connector
}


def build(args: argparse.Namespace, feedback: str, loops: int) -> RecursiveModel:
    base, _ = load_model(args.model, dtype="float32")
    if args.layers:
        truncate_layers(base, args.layers, args.pick)
    options = ({"scale_init": args.scale_init, "residual": args.residual, "connector_norm": args.connector_norm,
                "connector_gain": args.connector_gain} if feedback == "connector" else {})
    if args.loop_lora and loops > 1:  # at R = 1 a LoRA adds nothing that training the layers cannot
        options.update(loop_lora_rank=args.loop_lora, relaxed_loops=loops)
    return RecursiveModel.wrap(base, num_loops=args.loops, feedback=feedback, ends=args.ends, **options)


def run_variant(name: str, args, train_ids, eval_ids) -> tuple[RecursiveModel, dict]:
    spec = VARIANTS[name]
    loops = spec.get("loops", args.loops)
    torch.manual_seed(args.seed)  # the connector's and adapters' starting weights
    model = build(args, spec["feedback"], loops)
    before = step_perplexities(model, eval_ids, loops)
    trainable = ("connector", "layers") if spec["feedback"] == "connector" else ("layers",)
    if len(model.adapters.relax):
        trainable += ("loop_lora",)
    settings = RecursiveTrainSettings(
        steps=args.steps, loops=loops, batch_size=args.batch_size, lr=args.lr, connector_lr=args.connector_lr,
        loss=spec["loss"], trainable=trainable, seed=args.seed, eval_every=args.eval_every or max(1, args.steps),
        warmup_steps=max(1, args.steps // 10), mixed_precision=args.mixed_precision)
    result = train(model, train_ids, eval_ids if args.eval_every else None, settings)
    # one pass to the deepest step: steps 1..R of a deeper run are the R-step run's own steps
    evaluated = step_perplexities(model, eval_ids, max(loops, args.deeper) if loops > 1 else 1)
    after, deeper = evaluated[:loops], evaluated if len(evaluated) > loops else None
    print(f"{name}: held-out ppl per step before {fmt(before)} after {fmt(after)} ({result.seconds:.0f} s)", flush=True)
    return model, {"variant": name, "loops": loops, "loss": spec["loss"], "feedback": spec["feedback"],
                   "train_seconds": result.seconds, "seconds_per_step": result.seconds / max(1, args.steps),
                   "ppl_before": before, "ppl_after": after, "ppl_deeper": deeper,
                   "trainable_parameters": result.trainable_parameters,
                   "final_train_loss": result.history[-1]["loss"] if result.history else None,
                   "connector_scale": model.connector.scale.tolist() if model.connector is not None else None,
                   "train_step_ce": [h["step_ce"] for h in result.history], "curve": result.evaluations}


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def early_exit_sweep(model: RecursiveModel, stream, args) -> list[dict]:
    """Token-by-token decoding at every threshold; cost is relative to running all R steps."""
    rows, reference = [], None
    for threshold in [None, *(float(t) for t in args.thresholds.split(","))]:
        nll, loops = early_exit_nll(model, stream, args.loops, threshold, window=args.exit_tokens, max_windows=1)
        ppl = math.exp(nll)
        reference = reference or ppl
        exits = {str(step): count for step, count in enumerate(loops.step_counts(), start=1)}
        rows.append({"threshold": threshold, "perplexity": ppl, "ppl_cost_pct": 100 * (ppl / reference - 1),
                     "exit_step_counts": exits, **loops.to_dict()})
        print(f"early exit threshold {threshold}: ppl {ppl:.3f}, loops saved {100 * loops.saved_fraction:.1f}%",
              flush=True)
    return rows


def checks(variants: list[dict], early: list[dict]) -> dict[str, bool]:
    by_name = {v["variant"]: v for v in variants}
    found = {}
    if "connector_mrl" in by_name:
        ppl = by_name["connector_mrl"]["ppl_after"]
        found["RecursiveVLM held-out ppl improves at every step 1..R"] = all(b < a for a, b in zip(ppl, ppl[1:]))
        if "standard" in by_name:
            found["RecursiveVLM last step beats the standard model"] = ppl[-1] < by_name["standard"]["ppl_after"][0]
        if "vanilla" in by_name:
            found["RecursiveVLM last step beats vanilla recursion"] = ppl[-1] < by_name["vanilla"]["ppl_after"][-1]
    if early:
        good = [r for r in early[1:] if r["loops_saved"] >= SAVE_TARGET and r["ppl_cost_pct"] < COST_TARGET]
        found["early exit saves >= 30% of loops at < 2% ppl cost (some threshold)"] = bool(good)
    return found


def plot_steps(ax, variants: list[dict]) -> None:
    """Per-step perplexity (deeper-than-trained steps included) on a linear axis with a ceiling.

    Untrained-for steps (vanilla's step 1 is ~1e5) would squash the differences that matter
    into one line on any axis, so values above the ceiling are drawn at it and labelled.
    """
    finals = [v["ppl_after"][-1] for v in variants]
    ceiling = 1.5 * max(finals)
    for v in variants:
        values = v.get("ppl_deeper") or v["ppl_after"]
        if len(values) == 1:
            ax.axhline(values[0], linestyle="--", color="gray", label=f"{v['variant']} (R=1)")
            continue
        steps = list(range(1, len(values) + 1))
        line, = ax.plot(steps, [min(p, ceiling) for p in values], marker="o", label=f"{v['variant']} (R={v['loops']})")
        for step, value in zip(steps, values):
            if value > ceiling:
                ax.annotate(f"{value:.3g}", (step, ceiling), textcoords="offset points", xytext=(4, -10),
                            fontsize=8, color=line.get_color())
        if len(values) > v["loops"]:
            ax.axvline(v["loops"], color="gray", linestyle=":", linewidth=0.8)
    ax.set_ylim(top=ceiling * 1.02)
    ax.set_xlabel("recursion step (dotted: the trained depth R; later steps run deeper than trained)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Per-step held-out perplexity, equal training budget")
    ax.legend(fontsize=8)


def plot_against_standard(ax, variants: list[dict]) -> None:
    """Per-step perplexity relative to the standard model, for the looped variants that come within
    10% of it at some step: the differences that decide the targets, invisible on the full scale
    (values above ZOOM_PCT are drawn at it and labelled)."""
    standard = next((v["ppl_after"][0] for v in variants if v["loops"] == 1), None)
    looped = [v for v in variants if v["loops"] > 1]  # in plot_steps' colour order
    for index, v in enumerate(looped):
        values = v.get("ppl_deeper") or v["ppl_after"]
        if standard is None or min(values) > 1.1 * standard:
            continue
        steps, percent = range(1, len(values) + 1), [100 * (p / standard - 1) for p in values]
        ax.plot(steps, [min(x, ZOOM_PCT) for x in percent], marker="o", color=f"C{index}",
                label=f"{v['variant']} (R={v['loops']})")
        for step, x in zip(steps, percent):
            if x > ZOOM_PCT:  # e.g. vanilla's step 1, thousands of percent: drawn at the top, labelled
                ax.annotate(f"{x:+.3g}%", (step, ZOOM_PCT), textcoords="offset points", xytext=(4, -10),
                            fontsize=8, color=f"C{index}")
        if len(values) > v["loops"]:
            ax.axvline(v["loops"], color="gray", linestyle=":", linewidth=0.8)
    ax.axhline(0, linestyle="--", color="gray", label="standard (R = 1)")
    ax.set_xlabel("recursion step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("held-out perplexity vs standard (%)")
    ax.set_title("Zoom: against the standard model (below 0: better)")
    ax.legend(fontsize=8)


def last_step_curve(variants: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Held-out perplexity of every variant's last step at each evaluation during training."""
    curves = {v["variant"]: v["curve"] for v in variants if v.get("curve")}
    if not curves:
        return [], {}
    steps = [point["step"] for point in next(iter(curves.values()))]
    return steps, {name: [point["perplexity"][-1] for point in curve] for name, curve in curves.items()}


def plot_curve(ax, variants: list[dict]) -> None:
    """The last step against the standard model while training: is a gap closing or opening with budget?"""
    steps, curves = last_step_curve(variants)
    standard = curves.get("standard")
    for index, v in enumerate(v for v in variants if v["loops"] > 1):
        if standard and v["variant"] in curves:
            ax.plot(steps[1:], [100 * (p / s - 1) for p, s in zip(curves[v["variant"]][1:], standard[1:])],
                    marker="o", color=f"C{index}", label=f"{v['variant']}, step {v['loops']}")
    ax.axhline(0, linestyle="--", color="gray", label="standard (R = 1)")
    ax.set(xlabel="optimizer step", ylabel="held-out perplexity vs standard (%)",
           title="During training: last step vs standard")
    ax.legend(fontsize=8)


def plot_early_exit(ax, early: list[dict]) -> None:
    points = early[1:]
    ax.plot([100 * r["loops_saved"] for r in points], [r["ppl_cost_pct"] for r in points], marker="o")
    for r in points:
        ax.annotate(f"{r['threshold']:g}", (100 * r["loops_saved"], r["ppl_cost_pct"]), fontsize=8)
    ax.axvline(100 * SAVE_TARGET, color="gray", linestyle=":")
    ax.axhline(COST_TARGET, color="gray", linestyle=":")
    ax.set_xlabel("loops saved (%)")
    ax.set_ylabel("perplexity cost vs all R steps (%)")
    ax.set_title("Early exit (KL threshold annotated)")


def plot(variants: list[dict], early: list[dict], path: Path) -> None:
    drawers = [lambda ax: plot_steps(ax, variants), lambda ax: plot_against_standard(ax, variants)]
    if last_step_curve(variants)[0]:
        drawers.append(lambda ax: plot_curve(ax, variants))
    if early:
        drawers.append(lambda ax: plot_early_exit(ax, early))
    fig, axes = plt.subplots(1, len(drawers), figsize=(5.5 * len(drawers), 4), squeeze=False)
    for ax, draw in zip(axes[0], drawers):
        draw(ax)
    save_figure(fig, path)


def markdown(result: dict) -> str:
    settings = result["settings"]
    loops = max(v["loops"] for v in result["variants"])
    rows = [{"variant": v["variant"], "R": v["loops"], "loss": v["loss"],
             **{f"ppl step {i + 1}": p for i, p in enumerate(v["ppl_after"])},
             "ppl before training (per step)": fmt(v["ppl_before"]), "s/step": v["seconds_per_step"]}
            for v in result["variants"]]
    columns = ["variant", "R", "loss"] + [f"ppl step {i + 1}" for i in range(loops)]
    columns += ["ppl before training (per step)", "s/step"]
    layers = "all layers" if not settings["layers"] else (
        f"{settings['layers']} evenly spaced layers" if settings.get("pick") == "stepwise"
        else f"first {settings['layers']} layers")
    train_text, heldout_text = (("calib splits of the six novels, blocks taken in turn",
                                 "their heldout splits, in turn") if settings.get("data") == "interleaved" else
                                ("the first calib blocks: the start of Emma", "austen:persuasion (heldout)"))
    if settings.get("ends"):
        layers += f"; the first and last {settings['ends']} run once, around the loop"
    autocast = "bf16 autocast" if settings.get("mixed_precision", "bf16") == "bf16" else "no autocast"
    relaxed = (f" Every looped variant also trains a rank-{settings['loop_lora']} LoRA per loop."
               if settings.get("loop_lora") else "")
    lines = ["# Recursive transformers: standard vs vanilla vs RecursiveVLM", "",
             f"Model: {settings['model']} ({layers}, float32 weights, {autocast}); per variant "
             f"{settings['steps']} AdamW steps x {settings['batch_size']} x {settings['seq_len']} tokens of austen "
             f"({train_text}, same blocks in the same order), lr {settings['lr']:g} "
             f"(connector {settings['connector_lr']:g}), cosine schedule, embeddings/head frozen. "
             f"Held-out: {settings['eval_blocks']} x {settings['seq_len']} tokens of {heldout_text}. "
             f"Connector: residual onto the {settings['residual']} input, scale initialised at "
             f"{settings['scale_init']:g}, update sized by the {connector_size(settings)}. "
             "The standard model uses 1/R of the recursive models' compute per step."
             f"{relaxed}", "",
             format_table(rows, columns), ""]
    for check, ok in result["checks"].items():
        lines.append(f"- {check}: **{'yes' if ok else 'no'}**")
    if result.get("note"):
        lines += ["", result["note"]]
    lines += deeper_markdown(result["variants"])
    lines += curve_markdown(result["variants"])
    if result.get("early_exit"):
        lines += ["", *early_exit_markdown(result)]
    return "\n".join(lines) + "\n"


def connector_size(settings: dict) -> str:
    """What sizes the connector's update, in words (runs recorded before the option: the embeddings)."""
    gain = settings.get("connector_gain")
    if settings.get("connector_norm", "embeddings") == "residual":
        size = "RMS of the residual it is added onto, token by token"
    else:
        size = "input embeddings' RMS" if gain is None else "tap gains alone"
    return size + (f" (tap gains start at {gain:g})" if gain else "")


def deeper_markdown(variants: list[dict]) -> list[str]:
    """Held-out perplexity at more steps than trained: does quality keep rising with depth?"""
    rows = [{"variant": v["variant"], "trained at R": v["loops"],
             **{f"step {i + 1}": p for i, p in enumerate(v["ppl_deeper"])}}
            for v in variants if v.get("ppl_deeper")]
    if not rows:
        return []
    return ["", "## Deeper than trained (held-out perplexity at every step, same models)", "", format_table(rows)]


def curve_markdown(variants: list[dict]) -> list[str]:
    """Each variant's last-step held-out perplexity at every evaluation while training (`--eval-every`)."""
    steps, curves = last_step_curve(variants)
    if not steps:
        return []
    rows = []
    for index, step in enumerate(steps):
        row = {"optimizer step": step, **{name: values[index] for name, values in curves.items()}}
        if "standard" in curves and "connector_mrl" in curves:
            row["connector_mrl vs standard %"] = 100 * (curves["connector_mrl"][index] / curves["standard"][index] - 1)
        rows.append(row)
    return ["", "## During training (held-out perplexity of each variant's last step; cosine schedule over the "
            "whole budget)", "", format_table(rows)]


def early_exit_markdown(result: dict) -> list[str]:
    loops, tokens = result["settings"]["loops"], result["settings"]["exit_tokens"]
    rows = [{"KL threshold": r["threshold"] if r["threshold"] is not None else "none (all R)",
             "ppl": r["perplexity"], "ppl cost %": r["ppl_cost_pct"], "mean steps": r["mean_steps"],
             "loops saved %": 100 * r["loops_saved"],
             "tokens exiting at step 1..R": "/".join(str(c) for c in r["exit_step_counts"].values())}
            for r in result["early_exit"]]
    return [f"## Early exit (RecursiveVLM model, R = {loops}, token-by-token decoding with KV reuse)", "",
            f"{tokens} held-out tokens per threshold; exit when KL(step r || step r-1) < threshold, r >= 2 "
            f"(most that can be saved: {100 * (1 - 2 / loops):.0f}%). Cost is relative to running all R steps "
            "on the same tokens.", "", format_table(rows)]


def save(result: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result["variants"], result["early_exit"], out.with_suffix(".png"))


def paired_differences(runs: dict[int, dict]) -> list[dict]:
    """Each looped variant's held-out perplexity at every step against the standard model of the same
    seed (same start, data and batch order), in %: below 0 is better. Mean, SE and seeds below 0."""
    rows = []
    for name, first in common_variants(runs).items():
        if first["loops"] == 1:
            continue
        per_seed = [vs_standard(run, name) for run in runs.values()]
        for step in range(len(first["ppl_after"])):
            found = [differences[step] for differences in per_seed]
            mean, se = mean_and_se(found)
            rows.append({"variant": name, "step": step + 1, "vs standard %": mean, "SE": se,
                         "seeds better": sum(d < 0 for d in found), "seeds": len(found),
                         "per seed": " / ".join(f"{d:+.2f}" for d in found)})
    return rows


def vs_standard(run: dict, name: str) -> list[float]:
    """One seed's per-step perplexity of `name` against its standard model, in % (below 0: better)."""
    variants = by_variant(run)
    standard = variants["standard"]["ppl_after"][0]
    return [100 * (p / standard - 1) for p in variants[name]["ppl_after"]]


def by_variant(run: dict) -> dict[str, dict]:
    return {v["variant"]: v for v in run["variants"]}


def common_variants(runs: dict[int, dict]) -> dict[str, dict]:
    """The variants every seed ran (seeds may have run a subset), as the first seed ran them."""
    names = set.intersection(*(set(by_variant(run)) for run in runs.values()))
    return {name: v for name, v in by_variant(next(iter(runs.values()))).items() if name in names}


def seed_counts(runs: dict[int, dict]) -> list[dict]:
    """How many seeds meet each target of the single run (its `checks`), of the seeds that checked it."""
    names = dict.fromkeys(name for run in runs.values() for name in run["checks"])
    checked = {name: [run["checks"][name] for run in runs.values() if name in run["checks"]] for name in names}
    return [{"target": name, "seeds met": sum(found), "seeds": len(found)} for name, found in checked.items()]


def write_seed_summary(runs: dict[int, dict], folder: Path) -> None:
    """Per-seed runs summed up: mean perplexity per step, paired differences, targets per seed, plot."""
    table = []
    for name, first in common_variants(runs).items():
        for step in range(len(first["ppl_after"])):
            values = [by_variant(run)[name]["ppl_after"][step] for run in runs.values()]
            mean, se = mean_and_se(values)
            table.append({"variant": name, "step": step + 1, "mean ppl": mean, "SE": se,
                          "per seed": " / ".join(f"{v:.2f}" for v in values)})
    summary = {"seeds": list(runs), "settings": comparable_settings(next(iter(runs.values()))["settings"]),
               "perplexity": table, "vs_standard": paired_differences(runs), "targets": seed_counts(runs),
               "minutes": sum(run["seconds"] for run in runs.values()) / 60}
    write_json(folder.with_suffix(".json"), summary)
    lines = [f"# Recursive transformers over {len(runs)} seeds ({', '.join(map(str, runs))})", "",
             "Each seed draws its own batch order and start of the new weights; within a seed every variant shares "
             f"them. Settings and per-seed tables in {folder.name}/seed<N>.md. "
             f"Total {summary['minutes']:.0f} min of runs.",
             "", "## Held-out perplexity per step (mean over seeds, standard error)", "", format_table(table), "",
             "## Against the standard model of the same seed (paired, % perplexity; below 0: better)", "",
             "A mean within two standard errors of 0 is within seed noise.", "",
             format_table(summary["vs_standard"]), "", "## Targets: seeds where the single run meets them", "",
             format_table(summary["targets"])]
    folder.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot_seeds(runs, summary["vs_standard"], folder.with_suffix(".png"))


def plot_seeds(runs: dict[int, dict], paired: list[dict], path: Path) -> None:
    """Left: the paired difference to the standard model per step, every seed and the mean (what the
    target is decided on). Right: every seed's early-exit trade-off."""
    fig, (diff, early) = plt.subplots(1, 2, figsize=(11, 4))
    for index, name in enumerate(dict.fromkeys(r["variant"] for r in paired)):
        rows = [r for r in paired if r["variant"] == name]
        if min(r["vs standard %"] for r in rows) > 10:  # far above the standard model: off this scale
            continue
        steps = [r["step"] for r in rows]
        for run in runs.values():
            diff.plot(steps, vs_standard(run, name), color=f"C{index}", alpha=0.3, linewidth=0.8)
        diff.errorbar(steps, [r["vs standard %"] for r in rows], yerr=[r["SE"] for r in rows], marker="o",
                      capsize=3, color=f"C{index}", label=f"{name}: mean (bars: SE), thin: one seed")
    diff.axhline(0, linestyle="--", color="gray", label="standard (R = 1)")
    diff.set(xlabel="recursion step", ylabel="held-out perplexity vs standard (%)",
             title=f"Paired with the standard model, {len(runs)} seeds")
    diff.xaxis.get_major_locator().set_params(integer=True)
    diff.legend(fontsize=8)
    for seed, run in runs.items():
        points = run["early_exit"][1:]
        early.plot([100 * r["loops_saved"] for r in points], [r["ppl_cost_pct"] for r in points], marker="o",
                   label=f"seed {seed}")
    early.axvline(100 * SAVE_TARGET, color="gray", linestyle=":")
    early.axhline(COST_TARGET, color="gray", linestyle=":")
    early.set(xlabel="loops saved (%)", ylabel="perplexity cost vs all R steps (%)", title="Early exit, every seed")
    early.legend(fontsize=8)
    save_figure(fig, path)


def benchmark_data(tokenizer, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out blocks: in turn from all six novels, or the first calib blocks (Emma's
    start) with Persuasion's heldout split, on which a lead won on Emma has to carry over to a new book."""
    blocks = interleaved_blocks if args.data == "interleaved" else token_blocks
    heldout = DataSpec("austen", "heldout") if args.data == "interleaved" else PERSUASION_HELDOUT
    return (blocks(tokenizer, DataSpec("austen", "calib"), args.steps * args.batch_size, args.seq_len),
            blocks(tokenizer, heldout, args.eval_blocks, args.seq_len))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.seeds:
        run_benchmark(args, Path(args.out))
        return 0
    folder = Path(f"{args.out}_seeds")
    runs = {}
    for seed in args.seeds:
        path = folder / f"seed{seed}"
        runs[seed] = (reusable_run(path.with_suffix(".json"), vars(args), lambda found: found["seconds"] > 0)
                      or run_benchmark(argparse.Namespace(**{**vars(args), "seed": seed}), path))
    write_seed_summary(runs, folder)
    return 0


def run_benchmark(args: argparse.Namespace, out: Path) -> dict:
    """The whole benchmark for one seed: every variant, then the early-exit sweep; returns the results."""
    began = time.perf_counter()
    _, tokenizer = load_model(args.model, dtype="float32")
    train_ids, eval_ids = benchmark_data(tokenizer, args)
    result = {"settings": vars(args), "variants": [], "early_exit": [], "checks": {}, "seconds": 0.0}
    models = {}
    for name in args.variants.split(","):
        models[name], summary = run_variant(name, args, train_ids, eval_ids)
        result["variants"].append(summary)
        result["checks"] = checks(result["variants"], [])
        save(result, out)  # a crash later keeps what was measured
        if name != "connector_mrl":
            del models[name]  # only the RecursiveVLM model is needed afterwards
    if "connector_mrl" in models and args.exit_tokens > 0:
        stream = token_stream(tokenizer, PERSUASION_HELDOUT)
        result["early_exit"] = early_exit_sweep(models["connector_mrl"], stream, args)
    result["checks"] = checks(result["variants"], result["early_exit"])
    result["seconds"] = time.perf_counter() - began
    save(result, out)
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')}, .md, .png in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(main())
