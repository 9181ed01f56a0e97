"""RecursiveVLM on a small real VLM, on CPU: is looping with the Recursive Connector and the
Monotonic Recursion Loss better than a standard model and than vanilla recursion?

One command (`python benchmarks/recursive_vlm.py`):
1. the offline VQA set (MNIST, sklearn digits, digit pairs, scikit-image photos); frozen
   EfficientNet-Lite0 features of every image computed once and cached;
2. stage 1: the projector alone on a truncated SmolLM2-135M-Instruct (first N layers), R = 1;
3. stage 2 from the same stage-1 projector, with the same budget (steps x batch, same batches in the
   same order, same LoRA start):
   standard (R = 1), vanilla recursion (R = 3, last hidden fed back, loss at the last step),
   RecursiveVLM with a shared connector and with a modality-specific connector (R = 3,
   Monotonic Recursion Loss); every variant trains the projector and a rank-r LoRA shared by
   all loops, the LLM itself stays frozen;
4. held-out accuracy and answer perplexity at every step 1..3, hidden-state norm and linear CKA
   with the input embeddings of each step's input, per modality; the issue's targets checked.
Writes benchmarks/results/recursive_vlm.{json,md}, recursive_vlm_accuracy.png, recursive_vlm_norm_cka.png.

The defaults are the recorded run: first 4 of SmolLM2's 30 layers, stage 1 300 steps, stage 2
600 steps x batch 8 per variant, the whole held-out split scored (861 examples). With
`OMP_NUM_THREADS=1` on the 2-core development CPU, shared with another benchmark, it took
31-35 minutes: stage 1 1 min, stage 2 4 min for the standard model and 7-10 min for each R = 3
variant (a step at R = 3 costs 2-3x a step at R = 1: three passes, three decodes, the connector),
evaluation about 1 min per variant. `--steps` scales the stage-2 time linearly.

One seed's differences are the size of its noise (the standard model alone moved 0.764 <-> 0.779
with the projector's random start), so `--seeds 0,1,2` runs the benchmark once per seed (its own
split, starts and batch order; ~31 min each) and checks the targets on the mean paired
differences over seeds: recursive_vlm_seeds.{json,md}, recursive_vlm_seeds_accuracy.png. A seed
whose finished run is already in recursive_vlm_seeds/seed<N>/ with the same settings is reused, so
seeds can also run as separate jobs (`--seeds 1 --out benchmarks/results/recursive_vlm_seeds/seed1`)
before one `--seeds 0,1,2` run sums them up.

The connector's update is sized by the input embeddings' RMS here. `--connector-norm residual`, which
made the language-model loop of benchmarks/recursion.py win, lowered both connectors' accuracy at
seed 0 (below the standard model; recursive_vlm_options/connector_norm_residual/).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from seed_runs import comparable_settings, mean_and_se, parse_seeds, reusable_run  # noqa: E402

from depthkit.recursive.config import CONNECTOR_NORMS, RESIDUALS  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.vlm.batches import VQABatches  # noqa: E402
from depthkit.vlm.data import VQAConfig, build_vqa, dataset_features  # noqa: E402
from depthkit.vlm.evaluate import evaluate_steps, representation_stats  # noqa: E402
from depthkit.vlm.model import VLM_CONNECTOR, build_vlm  # noqa: E402
from depthkit.vlm.train import VLMTrainSettings, train_stage1, train_stage2  # noqa: E402

STANDARD, VANILLA = "standard (R = 1)", "vanilla recursive"
SHARED, SPECIFIC = "RecursiveVLM shared connector", "RecursiveVLM modality-specific"
VARIANTS = {
    STANDARD: dict(num_loops=1, feedback="vanilla", loss="sum"),
    VANILLA: dict(feedback="vanilla", loss="last"),  # recursive variants train at R = --loops
    SHARED: dict(feedback="connector", modality_specific=False, loss="monotonic"),
    SPECIFIC: dict(feedback="connector", modality_specific=True, loss="monotonic"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-layers", type=int, default=4, help="LLM layers kept (truncated for CPU time)")
    parser.add_argument("--loops", type=int, default=3, help="steps evaluated (and trained by recursive variants)")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600, help="stage-2 steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=2.0, help="Monotonic Recursion Loss penalty (1 = plain sum)")
    parser.add_argument("--scale-init", type=float, default=VLM_CONNECTOR["scale_init"],
                        help="initial residual scale of the connector")
    parser.add_argument("--residual", default=VLM_CONNECTOR["residual"], choices=RESIDUALS,
                        help="what the connector adds onto: the input embeddings or the previous step's input")
    parser.add_argument("--connector-norm", default=VLM_CONNECTOR["connector_norm"], choices=CONNECTOR_NORMS,
                        help="size the connector's update by the embeddings' RMS (the recorded runs) or, token "
                             "by token, by the RMS of the residual it is added onto")
    parser.add_argument("--eval-examples", type=int, default=0,
                        help="held-out examples scored per variant (0 = the whole held-out split)")
    parser.add_argument("--stats-examples", type=int, default=32, help="held-out examples for norm/CKA")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds; with several, each seed's run goes to "
                             "<out>/recursive_vlm_seeds/seed<N>/ (reused when its settings match) and the "
                             "targets are checked on the means over seeds")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    args.seeds = parse_seeds(parser, args.seeds)
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant '{unknown[0]}'; choose from: {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    if len(args.seeds) == 1:
        run_seed(args, args.seeds[0], Path(args.out))
        return
    runs = {}
    for seed in args.seeds:
        folder = Path(args.out) / "recursive_vlm_seeds" / f"seed{seed}"
        runs[seed] = (reusable_run(folder / "recursive_vlm.json", vars(args), lambda found: has_variants(found, args))
                      or run_seed(args, seed, folder))
    write_seed_summary(runs, Path(args.out))


def has_variants(results: dict, args: argparse.Namespace) -> bool:
    return set(results["variants"]) == set(args.variants.split(","))


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """The whole benchmark for one seed (data split, stage-1 start, LoRA start, batch order)."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    dataset = build_vqa(VQAConfig(seed=args.seed, num_mnist=1200, num_digits=300, num_pairs=600, photo_variants=6))
    features = dataset_features(dataset)
    vlm = build_vlm(args.model, args.num_layers, with_encoder=False)
    train_set = VQABatches(vlm, dataset, "train", features)
    heldout = VQABatches(vlm, dataset, "heldout", features, limit=args.eval_examples or None)
    stats_set = VQABatches(vlm, dataset, "heldout", features, limit=args.stats_examples)
    stage1_settings = VLMTrainSettings(steps=args.stage1_steps, batch_size=args.batch_size, lr=args.lr, loss="sum",
                                       seed=args.seed)
    stage1 = train_stage1(vlm, train_set, stage1_settings)
    aligned = copy.deepcopy(vlm.projector.state_dict())
    (stage1_quality,) = evaluate_steps(vlm, heldout, 1)
    results = {"settings": {**vars(args), "torch_threads": torch.get_num_threads()},
               "dataset": {"train": len(train_set), "heldout_scored": len(heldout), "config": dataset.config.__dict__},
               "stage1": {"seconds": stage1.seconds, "final_loss": stage1.losses[-1],
                          "heldout_accuracy": stage1_quality.accuracy, "perplexity": stage1_quality.perplexity},
               "variants": {}}
    torch.manual_seed(args.seed + 1)
    lora_init = copy.deepcopy(vlm.make_recursive(1, "vanilla", lora_rank=args.lora_rank).adapters.state_dict())
    for name in args.variants.split(","):
        spec = {"num_loops": args.loops, **VARIANTS[name]}
        if spec["feedback"] == "connector":
            spec.update(scale_init=args.scale_init, residual=args.residual, connector_norm=args.connector_norm)
        vlm.projector.load_state_dict(aligned)
        # the same batches, in the same order, for every variant
        settings = VLMTrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=spec.pop("loss"),
                                    beta=args.beta, seed=args.seed + 1)
        log = train_stage2(vlm, train_set, settings, lora_rank=args.lora_rank, desc=name, lora_init=lora_init,
                           **spec)
        quality = evaluate_steps(vlm, heldout, args.loops)
        stats = representation_stats(vlm, stats_set, args.loops, max_examples=args.stats_examples)
        results["variants"][name] = {
            "train_seconds": log.seconds, "trainable_parameters": log.trainable_parameters,
            "final_step_losses": log.step_losses[-1],
            "steps": [q.__dict__ for q in quality], "representation": stats,
        }
        if vlm.recursive.connector is not None:  # per modality (text, vision): how much of the feedback is used
            results["variants"][name]["connector_scale"] = vlm.recursive.connector.scale.tolist()
        print(format_table([_row(name, q) for q in quality]))
        results["targets"] = check_targets(results["variants"])
        results["total_seconds"] = time.perf_counter() - start
        write_outputs(results, out)  # after every variant: a long run leaves usable results
    return results


def check_targets(variants: dict) -> list[dict]:
    """The issue's targets, checked on the measured accuracies (only for the variants that ran).

    (a) every RecursiveVLM variant at each step r >= 2 beats the standard model (its one step) and
        vanilla recursion at the same step, and its accuracy never falls from step r-1 to r;
    (b) the modality-specific connector at least matches the shared one at every step.
    """
    accuracy = {name: [s["accuracy"] for s in v["steps"]] for name, v in variants.items()}
    rows = []

    def add(target: str, variant: str, step: int, value: float, reference: float) -> None:
        rows.append({"target": target, "variant": variant, "step": step, "accuracy": value,
                     "reference": reference, "difference": value - reference, "met": value >= reference
                     if target.startswith("(b)") else value > reference})

    for name in (SHARED, SPECIFIC):
        for step in range(2, len(accuracy.get(name, [])) + 1):
            value = accuracy[name][step - 1]
            if STANDARD in accuracy:
                add("(a) above standard R=1", name, step, value, accuracy[STANDARD][0])
            if VANILLA in accuracy:
                add("(a) above vanilla, same step", name, step, value, accuracy[VANILLA][step - 1])
            add("(a) not below step r-1", name, step, value, accuracy[name][step - 2])
            rows[-1]["met"] = value >= accuracy[name][step - 2]
    if SHARED in accuracy and SPECIFIC in accuracy:
        for step, (specific, shared) in enumerate(zip(accuracy[SPECIFIC], accuracy[SHARED]), start=1):
            add("(b) specific >= shared", SPECIFIC, step, specific, shared)
    return rows


def seed_differences(runs: dict[int, dict]) -> list[dict]:
    """The targets' comparisons as paired differences per seed (same data, start and batches within a
    seed), with their mean and standard error over seeds; a target is met when the mean difference is."""
    rows = []
    for target in ("(a) above standard R=1", "(a) above vanilla, same step", "(a) not below step r-1",
                   "(b) specific >= shared"):
        keys = sorted({(r["variant"], r["step"]) for run in runs.values() for r in run["targets"]
                       if r["target"] == target})
        for variant, step in keys:
            found = [r["difference"] for run in runs.values() for r in run["targets"]
                     if (r["target"], r["variant"], r["step"]) == (target, variant, step)]
            mean, se = mean_and_se(found)
            strict = not (target.startswith("(b)") or "not below" in target)
            rows.append({"target": target, "variant": variant, "step": step, "mean difference": mean,
                         "SE": se, "seeds met": sum(d > 0 if strict else d >= 0 for d in found),
                         "seeds": len(found), "met (mean)": mean > 0 if strict else mean >= 0})
    return rows


def write_seed_summary(runs: dict[int, dict], out: Path) -> None:
    """Mean accuracy per variant and step over seeds, the paired target differences, and a plot."""
    first = next(iter(runs.values()))
    table = []
    for name, variant in first["variants"].items():
        steps = 1 if name == STANDARD else len(variant["steps"])
        for step in range(steps):
            accuracy = [run["variants"][name]["steps"][step]["accuracy"] for run in runs.values()]
            perplexity = [run["variants"][name]["steps"][step]["perplexity"] for run in runs.values()]
            mean, se = mean_and_se(accuracy)
            table.append({"variant": name, "step": step + 1, "mean accuracy": mean, "SE": se,
                          "per seed": " / ".join(f"{a:.3f}" for a in accuracy),
                          "mean answer ppl": sum(perplexity) / len(perplexity)})
    summary = {"seeds": list(runs), "settings": comparable_settings(first["settings"]),
               "accuracy": table, "targets": seed_differences(runs),
               "minutes": sum(run["total_seconds"] for run in runs.values()) / 60}
    write_json(out / "recursive_vlm_seeds.json", summary)
    lines = [f"# Recursive VLM over {len(runs)} seeds ({', '.join(map(str, runs))})", "",
             "Each seed draws its own train/held-out split, stage-1 projector start, LoRA start and batch order; "
             "within a seed every variant shares them. Settings as in recursive_vlm.md; per-seed results in "
             f"recursive_vlm_seeds/seed<N>/. Total {summary['minutes']:.0f} min of runs.", "",
             "## Held-out answer accuracy per recursion step (mean over seeds, standard error)", "",
             format_table(table), "",
             "## Targets as paired differences (variant minus reference, per seed)", "",
             "A target is met when the mean paired difference is (> 0, or >= 0 for 'not below' and (b)); 'seeds "
             "met' counts the seeds where it holds alone. A mean under two standard errors is within seed noise.",
             "", format_table(summary["targets"])]
    (out / "recursive_vlm_seeds.md").write_text("\n".join(lines) + "\n")
    plot_seed_accuracy(table, summary["targets"], out / "recursive_vlm_seeds_accuracy.png", len(runs))


def plot_seed_accuracy(table: list[dict], targets: list[dict], path: Path, seeds: int) -> None:
    """Mean accuracy per step (left) and the paired difference to the standard model (right), which
    is what target (a) is decided on and what the per-variant error bars hide."""
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {name: f"C{index}" for index, name in enumerate(dict.fromkeys(row["variant"] for row in table))}
    for name in (SHARED, SPECIFIC):
        rows = [r for r in targets if r["target"] == "(a) above standard R=1" and r["variant"] == name]
        diff.errorbar([r["step"] for r in rows], [100 * r["mean difference"] for r in rows],
                      yerr=[100 * r["SE"] for r in rows], marker="o", capsize=3, color=colours.get(name), label=name)
    diff.axhline(0, color=colours.get(STANDARD), linestyle="--", label=STANDARD)
    diff.set(xlabel="recursion depth R", ylabel="accuracy minus the standard model's (points)",
             title="paired difference to the standard model (bars: SE)")
    diff.xaxis.get_major_locator().set_params(integer=True)
    diff.grid(alpha=0.3)
    diff.legend(fontsize=8)
    for index, name in enumerate(dict.fromkeys(row["variant"] for row in table)):
        rows = [row for row in table if row["variant"] == name]
        if name == STANDARD:
            mean, se = rows[0]["mean accuracy"], rows[0]["SE"]
            ax.axhline(mean, color=f"C{index}", linestyle="--", label=f"{name}, one pass")
            ax.axhspan(mean - se, mean + se, color=f"C{index}", alpha=0.15)
            continue
        ax.errorbar([r["step"] for r in rows], [r["mean accuracy"] for r in rows], yerr=[r["SE"] for r in rows],
                    marker="o", capsize=3, color=f"C{index}", label=name)
    ax.set(xlabel="recursion depth R", ylabel="held-out answer accuracy",
           title=f"accuracy vs depth, mean over {seeds} seeds (bars: SE)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _row(name: str, quality) -> dict:
    return {"variant": name, "step": quality.step, "accuracy": quality.accuracy, "answer ppl": quality.perplexity,
            **{f"acc {t}": a for t, a in quality.task_accuracy.items()}}


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recursive_vlm.json", results)
    rows = [_row(name, _Quality(**s)) for name, v in results["variants"].items() for s in v["steps"]]
    rep_rows = [{"variant": name, "modality": modality, "step": s["step"], "input norm": s["norm"],
                 "CKA(input, embeddings)": s["cka_to_embeddings"]}
                for name, v in results["variants"].items() for modality, steps in v["representation"].items()
                for s in steps]
    s = results["settings"]
    n = results["dataset"]["heldout_scored"]
    lines = [
        "# Recursive VLM (EfficientNet-Lite0 + SmolLM2-135M-Instruct, first "
        f"{s['num_layers']} layers), CPU",
        "",
        f"Held-out examples scored: {results['dataset']['heldout_scored']} (train set {results['dataset']['train']}). "
        f"Stage 1 (projector only, LLM frozen): {s['stage1_steps']} steps, held-out accuracy "
        f"{results['stage1']['heldout_accuracy']:.4f}, answer perplexity {results['stage1']['perplexity']:.4g}; "
        "every variant's stage 2 starts from this projector.",
        "",
        f"Stage 2: {s['steps']} steps x batch {s['batch_size']} per variant, the same batches in the same order "
        f"and the same LoRA start (rank {s['lora_rank']}) for every variant, lr {s['lr']}, beta {s['beta']}, "
        f"connector scale init {s.get('scale_init', 0.0)}, residual onto the {s.get('residual', 'embeddings')} input, "
        f"update sized by the {s.get('connector_norm', 'embeddings')} RMS. "
        f"{s['torch_threads']} CPU thread(s); total {results['total_seconds'] / 60:.1f} min.",
        *(["", results["note"]] if results.get("note") else []),
        "",
        "## Held-out answer accuracy and answer perplexity per recursion step",
        "",
        format_table(rows),
        "",
        f"Steps 2+ of {STANDARD}: the one-pass model looped with vanilla feedback, never trained to loop.",
        "",
        "## Step inputs: mean norm and linear CKA with the input embeddings, per modality",
        "",
        format_table(rep_rows),
        "",
        "Train seconds (trainable parameters) per variant: " + ", ".join(
            f"{n}: {v['train_seconds']:.0f} s ({v['trainable_parameters']:,})" for n, v in results["variants"].items()),
        "",
        "Connector residual scale after training (per modality of the connector: text, vision): " + (", ".join(
            f"{n}: {[float(f'{x:.3g}') for x in v['connector_scale']]}" for n, v in results["variants"].items()
            if "connector_scale" in v) or "not recorded"),
        "",
        "## Targets",
        "",
        f"Binomial standard error of one accuracy over n = {n} held-out examples: at most 0.5 / sqrt(n) = "
        f"{0.5 / n ** 0.5:.3f}; differences of that size are within noise.",
        "",
        format_table(results["targets"]) if results["targets"] else "(needs the RecursiveVLM variants)",
    ]
    (out / "recursive_vlm.md").write_text("\n".join(lines) + "\n")
    plot_accuracy(results, out / "recursive_vlm_accuracy.png")
    plot_norm_cka(results, out / "recursive_vlm_norm_cka.png")


class _Quality:
    def __init__(self, step, accuracy, perplexity, task_accuracy):
        self.step, self.accuracy, self.perplexity, self.task_accuracy = step, accuracy, perplexity, task_accuracy


def plot_accuracy(results: dict, path: Path) -> None:
    """Accuracy and answer perplexity per step; the standard model is the dashed line of its one
    pass (its looped steps, never trained, would squash the differences that matter)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, variant) in enumerate(results["variants"].items()):
        steps = [s["step"] for s in variant["steps"]]
        accuracy, perplexity = [s["accuracy"] for s in variant["steps"]], [s["perplexity"] for s in variant["steps"]]
        if name == STANDARD:
            axes[0].axhline(accuracy[0], color=f"C{index}", linestyle="--", label=f"{name}, one pass")
            axes[1].axhline(perplexity[0], color=f"C{index}", linestyle="--", label=f"{name}, one pass")
            continue
        axes[0].plot(steps, accuracy, marker="o", color=f"C{index}", label=name)
        axes[1].plot(steps, perplexity, marker="o", color=f"C{index}", label=name)
    axes[0].set(xlabel="recursion depth R", ylabel="held-out answer accuracy", title="accuracy vs depth")
    axes[1].set(xlabel="recursion depth R", ylabel="answer perplexity", title="answer perplexity vs depth")
    for ax in axes:
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_norm_cka(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"text": "-", "vision": "--"}
    for index, (name, variant) in enumerate(results["variants"].items()):
        for modality, steps in variant["representation"].items():
            x = [s["step"] for s in steps]
            kwargs = dict(color=f"C{index}", linestyle=styles[modality], marker="o", label=f"{name} / {modality}")
            axes[0].plot(x, [s["norm"] for s in steps], **kwargs)
            axes[1].plot(x, [s["cka_to_embeddings"] for s in steps], **kwargs)
    axes[0].set(xlabel="input of step r", ylabel="mean hidden-state norm", title="norm of each step's input",
                yscale="log")
    axes[1].set(xlabel="input of step r", ylabel="linear CKA with input embeddings", title="drift from embeddings")
    for ax in axes:
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
