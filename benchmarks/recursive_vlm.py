"""RecursiveVLM on a small real VLM, on CPU: is looping with the Recursive Connector and the
Monotonic Recursion Loss better than a standard model and than vanilla recursion?

One command (`python benchmarks/recursive_vlm.py`):
1. the offline VQA set (MNIST, sklearn digits, digit pairs, scikit-image photos); frozen
   EfficientNet-Lite0 features of every image computed once and cached;
2. stage 1: the projector alone on a truncated SmolLM2-135M-Instruct (first N layers), R = 1;
3. stage 2 from the same stage-1 projector, with the same budget (steps x batch, same batches):
   standard (R = 1), vanilla recursion (R = 3, last hidden fed back, loss at the last step),
   RecursiveVLM with a shared connector and with a modality-specific connector (R = 3,
   Monotonic Recursion Loss); every variant trains the projector and a rank-r LoRA shared by
   all loops, the LLM itself stays frozen;
4. held-out accuracy and answer perplexity at every step 1..3, hidden-state norm and linear CKA
   with the input embeddings of each step's input, per modality.
Writes benchmarks/results/recursive_vlm.{json,md}, recursive_vlm_accuracy.png, recursive_vlm_norm_cka.png.
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

from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.vlm.batches import VQABatches  # noqa: E402
from depthkit.vlm.data import VQAConfig, build_vqa, dataset_features  # noqa: E402
from depthkit.vlm.evaluate import evaluate_steps, representation_stats  # noqa: E402
from depthkit.vlm.model import build_vlm  # noqa: E402
from depthkit.vlm.train import TrainSettings, train_stage1, train_stage2  # noqa: E402

VARIANTS = {
    "standard (R=1)": dict(num_loops=1, feedback="vanilla", loss="sum"),
    "vanilla recursive": dict(num_loops=3, feedback="vanilla", loss="last"),
    "RecursiveVLM shared connector": dict(num_loops=3, feedback="connector", modality_specific=False,
                                          loss="monotonic"),
    "RecursiveVLM modality-specific": dict(num_loops=3, feedback="connector", modality_specific=True,
                                           loss="monotonic"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-layers", type=int, default=4, help="LLM layers kept (truncated for CPU time)")
    parser.add_argument("--loops", type=int, default=3, help="steps evaluated (and trained by recursive variants)")
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60, help="stage-2 steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--eval-examples", type=int, default=240, help="held-out examples scored per variant")
    parser.add_argument("--stats-examples", type=int, default=32, help="held-out examples for norm/CKA")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    dataset = build_vqa(VQAConfig(seed=args.seed, num_mnist=1200, num_digits=300, num_pairs=600, photo_variants=6))
    features = dataset_features(dataset)
    vlm = build_vlm(args.model, args.num_layers, with_encoder=False)
    train_set = VQABatches(vlm, dataset, "train", features)
    heldout = VQABatches(vlm, dataset, "heldout", features, limit=args.eval_examples)
    stats_set = VQABatches(vlm, dataset, "heldout", features, limit=args.stats_examples)
    stage1 = train_stage1(vlm, train_set, TrainSettings(args.stage1_steps, args.batch_size, args.lr, loss="sum",
                                                        seed=args.seed))
    aligned = copy.deepcopy(vlm.projector.state_dict())
    results = {"settings": vars(args), "dataset": {"train": len(train_set), "heldout_scored": len(heldout),
                                                   "config": dataset.config.__dict__},
               "stage1": {"seconds": stage1.seconds, "final_loss": stage1.losses[-1]}, "variants": {}}
    stage1_quality = evaluate_steps(vlm, heldout, 1)
    results["stage1"]["heldout_accuracy"] = stage1_quality[0].accuracy
    for name in args.variants.split(","):
        spec = dict(VARIANTS[name])
        vlm.projector.load_state_dict(aligned)
        settings = TrainSettings(args.steps, args.batch_size, args.lr, loss=spec.pop("loss"), beta=args.beta,
                                 seed=args.seed + 1)
        torch.manual_seed(args.seed + 1)  # same LoRA initialisation for every variant
        log = train_stage2(vlm, train_set, settings, lora_rank=args.lora_rank, desc=name, **spec)
        quality = evaluate_steps(vlm, heldout, args.loops)
        stats = representation_stats(vlm, stats_set, args.loops, max_examples=args.stats_examples)
        results["variants"][name] = {
            "train_seconds": log.seconds, "trainable_parameters": log.trainable_parameters,
            "final_step_losses": log.step_losses[-1],
            "steps": [q.__dict__ for q in quality], "representation": stats,
        }
        print(format_table([_row(name, q) for q in quality]))
        results["total_seconds"] = time.perf_counter() - start
        write_outputs(results, Path(args.out))  # after every variant: a long run leaves usable results


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
    lines = [
        "# Recursive VLM (EfficientNet-Lite0 + SmolLM2-135M-Instruct, first "
        f"{s['num_layers']} layers), CPU",
        "",
        f"Held-out examples scored: {results['dataset']['heldout_scored']} (train set {results['dataset']['train']}). "
        f"Stage 1: {s['stage1_steps']} steps (held-out accuracy {results['stage1']['heldout_accuracy']:.4f}); "
        f"stage 2: {s['steps']} steps x batch {s['batch_size']} per variant, LoRA rank {s['lora_rank']}, "
        f"beta {s['beta']}. Total {results['total_seconds'] / 60:.1f} min.",
        "",
        "## Held-out answer accuracy and answer perplexity per recursion step",
        "",
        format_table(rows),
        "",
        "## Step inputs: mean norm and linear CKA with the input embeddings, per modality",
        "",
        format_table(rep_rows),
        "",
        "Train seconds per variant: " + ", ".join(f"{n}: {v['train_seconds']:.0f}"
                                                    for n, v in results["variants"].items()),
    ]
    (out / "recursive_vlm.md").write_text("\n".join(lines) + "\n")
    plot_accuracy(results, out / "recursive_vlm_accuracy.png")
    plot_norm_cka(results, out / "recursive_vlm_norm_cka.png")


class _Quality:
    def __init__(self, step, accuracy, perplexity, task_accuracy):
        self.step, self.accuracy, self.perplexity, self.task_accuracy = step, accuracy, perplexity, task_accuracy


def plot_accuracy(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, variant in results["variants"].items():
        steps = [s["step"] for s in variant["steps"]]
        axes[0].plot(steps, [s["accuracy"] for s in variant["steps"]], marker="o", label=name)
        axes[1].plot(steps, [s["perplexity"] for s in variant["steps"]], marker="o", label=name)
    axes[0].set(xlabel="recursion depth R", ylabel="held-out answer accuracy", title="accuracy vs depth")
    axes[1].set(xlabel="recursion depth R", ylabel="answer perplexity", title="answer perplexity vs depth",
                yscale="log")
    for ax in axes:
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
