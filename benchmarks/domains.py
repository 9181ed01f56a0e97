"""Domain transfer: every method calibrated on each domain (and mixtures), judged on every domain's held-out text.

    .venv/bin/python benchmarks/domains.py                                # all methods, 20% and 30%
    .venv/bin/python benchmarks/domains.py --ratios 0.2 --methods shortgpt sleb flatten --lodo
    .venv/bin/python benchmarks/domains.py --variant "flatten_w1=flatten:ridge_prior=weights;ridge=1" --calibs austen
    .venv/bin/python benchmarks/domains.py --quick                        # smoke run

Domains are depthkit's offline corpora: Austen's novels (prose), Shakespeare's plays (drama and
verse), the Python documentation (a technical manual) and the standard library's source (code).
Calibrations: each domain alone, the mixture of all four (`mix`, depthkit's default) and, with
`--lodo`, every leave-one-domain-out mixture: the mixture's own out-of-domain figure, and how
defaults are chosen (cross-validation inside the calibration data, never on evaluation text).
Calibration: `--calib-blocks` x `--calib-len` tokens sampled over the whole calib split; evaluation:
`--eval-blocks` x `--eval-len` tokens sampled over each domain's held-out split (never overlapping).

Per model and domain: perplexity, top-1 agreement and KL(original || model) of the next-token
distributions. Per method and ratio: the geometric mean of perplexity relative to the original
over the domains NOT in its calibration (out of domain, what users care about) and over those in
it (in domain), and the same against the best block-removal baseline of the same calibration.
Writes benchmarks/results/domains.{json,md,png} (`_quick` for --quick), after every run;
a re-run keeps the runs already there (same settings) and adds the missing ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from depthkit.cli.common import non_negative_int  # noqa: E402
from depthkit.cli.compress import parse_options  # noqa: E402
from depthkit.compress import compress  # noqa: E402
from depthkit.compress.api import list_methods  # noqa: E402
from depthkit.data import DataSpec  # noqa: E402
from depthkit.data.blocks import sample_blocks  # noqa: E402
from depthkit.data.corpora import DEFAULT_CALIB, MIX_COMPONENTS, mixture_sources  # noqa: E402
from depthkit.errors import DepthkitError  # noqa: E402
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
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.utils.precision import dtype_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DOMAINS = MIX_COMPONENTS
BLOCK_REMOVAL = ("shortgpt", "sleb", "laco")  # the baselines FlattenGPT must beat (attention drop removes no block)
DIAGNOSTIC = ("flatten_unpruned",)  # upper bounds, not products: measured only when asked for
# Runs are comparable (and a results file is resumed or shared) when these settings are equal.
SETTINGS = ("model", "dtype", "calibration", "evaluation", "chat", "zeroshot")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--methods", nargs="*", default=None,
                        help="registered methods (default: all but the unpruned upper bound)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE;...",
                        help="also run METHOD with these options under NAME (repeatable)")
    parser.add_argument("--calibs", nargs="*", default=[*DOMAINS, DEFAULT_CALIB],
                        help="calibration corpora or mixtures (default: each domain and the mixture)")
    parser.add_argument("--lodo", action="store_true", help="add every leave-one-domain-out mixture")
    parser.add_argument("--calib-blocks", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per domain")
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--stem", default=None, help="results file name (default domains, or domains_quick)")
    parser.add_argument("--zeroshot-limit", type=non_negative_int, default=DOMAIN_ITEMS,
                        help="zero-shot items per task and domain for the runs calibrated on the default mixture "
                             "(0: none)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8x128 calibration, 2x128 per domain")
    args = parser.parse_args()
    if args.quick:
        args.calib_blocks, args.calib_len, args.eval_blocks, args.eval_len, args.zeroshot_limit = 8, 128, 2, 128, 8
        args.ratios, args.calibs = [0.1], ["austen", DEFAULT_CALIB]
    if args.lodo:
        args.calibs += ["+".join(d for d in DOMAINS if d != left_out) for left_out in DOMAINS]
    return args


def runs_to_do(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, method, options) of every run: the methods with their defaults, then the variants."""
    methods = args.methods if args.methods is not None else [
        m["method"] for m in list_methods() if m["method"] not in DIAGNOSTIC]
    runs = [(m, m, {}) for m in methods]
    for text in args.variant:
        name, _, rest = text.partition("=")
        method, _, options = rest.partition(":")
        if not (name and method):
            raise SystemExit(f"--variant expects NAME=METHOD[:KEY=VALUE;...], got {text!r}")
        runs.append((name, method, parse_options([o for o in options.split(";") if o])))
    return runs


def in_calibration(calib: str, domain: str) -> bool:
    return domain in mixture_sources(calib)


class Judge:
    """Everything a model is measured on: held-out blocks of every domain with the original's
    predictions, the original's answers to the chat prompts, and the zero-shot tasks."""

    def __init__(self, model, tokenizer, args: argparse.Namespace) -> None:
        self.tokenizer, self.zeroshot_limit = tokenizer, args.zeroshot_limit
        sizes = dict(blocks=args.eval_blocks, block_len=args.eval_len)
        self.heldout = BehaviourSuite(model, tokenizer, list(DOMAINS), "heldout", **sizes)
        self.calib = BehaviourSuite(model, tokenizer, list(DOMAINS), "calib", chat=False, frozen=self.heldout.frozen,
                                    **sizes)
        self.chat = self.heldout.chat

    def measure(self, model, zeroshot: bool, calib: str | None = None) -> dict[str, Any]:
        """Held-out figures of every domain; for the domains not in `calib`, also their calib split
        (`cv`): what defaults are chosen on, so that no choice is made on evaluation text."""
        held_out = self.heldout.measure(model)
        result = {"domains": held_out["domains"], "chat": held_out["chat"]}
        if calib is not None:
            left_out = [d for d in DOMAINS if not (calib and in_calibration(calib, d))]
            result["cv"] = self.calib.measure(model, left_out)["domains"]
        if zeroshot and self.zeroshot_limit:
            result |= zero_shot_record(model, self.tokenizer, self.zeroshot_limit)
        return result


def relative(row: dict[str, Any], base: dict[str, Any], inside: bool) -> list[float]:
    """Perplexity / original's over the domains in (inside) or not in the row's calibration."""
    return [row["domains"][d]["perplexity"] / base["domains"][d]["perplexity"]
            for d in row["domains"] if in_calibration(row["calib"], d) == inside]


def summary(rows: list[dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (name, ratio): geo-mean relative perplexity out of and in domain, over all calibrations,
    and the ratio to the best block-removal baseline of each calibration (out of domain)."""
    done = [r for r in rows if "domains" in r]
    best_baseline: dict[tuple[str, float], float] = {}
    for r in done:
        if r["method"] in BLOCK_REMOVAL and not r.get("note"):  # a baseline that removed less is no yardstick
            key, ood = (r["calib"], r["ratio"]), geo_mean(relative(r, base, False)) or math.inf
            best_baseline[key] = min(best_baseline.get(key, math.inf), ood)
    table = []
    for name, ratio in sorted({(r["name"], r["ratio"]) for r in done}, key=lambda k: (k[1], k[0])):
        mine = [r for r in done if (r["name"], r["ratio"]) == (name, ratio)]
        ood = [v for r in mine for v in relative(r, base, False)]
        cv = [r["cv"][d]["perplexity"] / base["cv"][d]["perplexity"] for r in mine for d in r.get("cv", {})]
        ind = [v for r in mine for v in relative(r, base, True)]
        versus = [geo_mean(relative(r, base, False)) / best_baseline[(r["calib"], ratio)] for r in mine
                  if (r["calib"], ratio) in best_baseline and relative(r, base, False)]
        table.append({"method": name, "ratio": ratio, "calibrations": len(mine),
                      "out-of-domain ppl / original": geo_mean(ood), "in-domain ppl / original": geo_mean(ind),
                      "CV: left-out domains' calib split": geo_mean(cv),
                      "out-of-domain vs best block removal": geo_mean(versus),
                      "top-1 agreement": float(np.mean([d["top1_agreement"] for r in mine
                                                        for d in r["domains"].values()])),
                      "chat same answer": float(np.mean([r["chat"]["same_answer"] for r in mine])),
                      "zero-shot retained": retained(mine, base), "95% interval": retained_interval(mine, base),
                      "note": "; ".join(sorted({r["note"] for r in mine if r.get("note")}))})
    return table


def retained(rows: list[dict[str, Any]], base: dict[str, Any]) -> float | None:
    """Zero-shot average accuracy over the original's, averaged over domains (runs that measured it)."""
    scored = [r["zeroshot"] for r in rows if r.get("zeroshot")]
    if not scored or not base.get("zeroshot"):
        return None
    return float(np.mean([retention(z, base["zeroshot"]) for z in scored]))


def retained_interval(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    """The paired bootstrap interval of `retained`, where one run measured it item by item (runs of
    an older file hold averages only)."""
    scored = [r["zeroshot_items"] for r in rows if r.get("zeroshot_items")]
    if len(scored) != 1 or not base.get("zeroshot_items"):
        return ""
    low, high = retention_interval(scored[0], base["zeroshot_items"])
    return f"{low:.3f} - {high:.3f}"


def write_results(result: dict[str, Any], stem: str) -> None:
    """Write the results, keeping runs that another process wrote to the same file meanwhile (two
    invocations with the same settings may share the work, e.g. one running the slow SLEB)."""
    path = RESULTS / f"{stem}.json"
    if path.exists():
        on_disk = json.loads(path.read_text())
        if all(on_disk.get(k) == result.get(k) for k in SETTINGS):
            mine = {(r["name"], r["calib"], r["ratio"]) for r in result["rows"]}
            result["rows"] += [r for r in on_disk["rows"] if (r["name"], r["calib"], r["ratio"]) not in mine]
    write_json(path, result)
    base, rows = result["base"], result["rows"]
    lines = [f"# Domain transfer ({result['model']})", "",
             f"- calibration: {result['calibration']}", f"- evaluation: {result['evaluation']}",
             f"- dtype: {result['dtype']}; machine: {result['machine']}", "",
             "Perplexity relative to the original, geometric mean over calibrations: out of domain = the domains "
             "not in the calibration, in domain = those in it. `vs best block removal`: the method's out-of-domain "
             "figure over that of the best of ShortGPT, SLEB and LaCo with the same calibration (< 1: better; a "
             "baseline that stopped short of the requested depth, noted, does not count). "
             "`CV`: the same out-of-domain figure on the calib split of the left-out domains, text that no run "
             "calibrates on and no reported figure uses: defaults are chosen on it, never on held-out text. "
             "`95% interval`: of the zero-shot retention, a paired bootstrap over the items (the model and the "
             "original resampled together).", "",
             format_table(summary(rows, base)), "", "## Every run (perplexity per held-out domain)", ""]
    columns = ["method", "calib", "ratio", *DOMAINS, "top-1 agreement (mean)", "chat same answer",
               "zero-shot acc (mean)", "compress s", "note"]
    table = [{"method": "original", "calib": "", "ratio": 0} | run_cells(base)]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["calib"], r["name"])):
        cells = (run_cells(r) | {"compress s": r["seconds"], "note": r.get("note", "")} if "domains" in r
                 else {"compress s": r["error"]})
        table.append({"method": r["name"], "calib": r["calib"], "ratio": r["ratio"]} | cells)
    lines += [format_table(table, columns), ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    heatmap(rows, base, RESULTS / f"{stem}.png", result["model"])


def run_cells(run: dict[str, Any]) -> dict[str, Any]:
    """One model's figures for the table of every run."""
    zeroshot = run.get("zeroshot")
    return {**{d: run["domains"][d]["perplexity"] for d in DOMAINS},
            "top-1 agreement (mean)": float(np.mean([v["top1_agreement"] for v in run["domains"].values()])),
            "chat same answer": run["chat"]["same_answer"],
            "zero-shot acc (mean)": float(np.mean(list(zeroshot.values()))) if zeroshot else ""}


def heatmap(rows: list[dict[str, Any]], base: dict[str, Any], path: Path, model: str) -> None:
    """log2(perplexity / original) per run (rows) and held-out domain (columns), one panel per ratio;
    in-domain cells are outlined."""
    done = [r for r in rows if "domains" in r]
    ratios = sorted({r["ratio"] for r in done})
    if not ratios:
        return
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 0.32 * max(8, len(done) / len(ratios)) + 2),
                             squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        mine = sorted([r for r in done if r["ratio"] == ratio], key=lambda r: (r["name"], r["calib"]))
        values = np.array([[math.log2(r["domains"][d]["perplexity"] / base["domains"][d]["perplexity"])
                            for d in DOMAINS] for r in mine])
        image = ax.imshow(values, cmap="magma_r", vmin=0, vmax=max(2.0, float(values.max())), aspect="auto")
        ax.set_xticks(range(len(DOMAINS)), DOMAINS)
        ax.set_yticks(range(len(mine)), [f"{r['name']} | {r['calib']}" for r in mine], fontsize=7)
        for i, r in enumerate(mine):
            for j, d in enumerate(DOMAINS):
                ax.text(j, i, f"{2 ** values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] > 1.2 else "black")
                if in_calibration(r["calib"], d):
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.2))
        ax.set_title(f"{model}: {ratio:.0%} of blocks removed\nperplexity / original (outlined: in calibration)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, label="log2(ppl / original)")
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    stem = args.stem or ("domains_quick" if args.quick else "domains")
    model, tokenizer = load_model(args.model)
    judge = Judge(model, tokenizer, args)
    settings = {"model": args.model, "dtype": dtype_name(next(model.parameters()).dtype),
                "calibration": f"{args.calib_blocks} x {args.calib_len} tokens sampled over the calib split",
                "evaluation": f"{args.eval_blocks} x {args.eval_len} tokens sampled over each domain's heldout split "
                              "(and, for choosing defaults, over the calib split of the domains left out)",
                "chat": f"{len(judge.chat)} prompts, the original's greedy answers of up to 32 tokens",
                "zeroshot": f"{args.zeroshot_limit} items per task (cloze, continuation) from the heldout split of "
                            f"{', '.join(ZEROSHOT_DOMAINS)}, runs calibrated on {DEFAULT_CALIB}",
                "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}"}
    path = RESULTS / f"{stem}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    same = all(previous.get(k) == settings[k] for k in SETTINGS)
    rows = previous.get("rows", []) if same else []
    base = previous["base"] if same else judge.measure(model, zeroshot=True, calib="") | {
        "chat_answers": {ref.prompt: ref.answer for ref in judge.chat}}
    done = {(r["name"], r["calib"], r["ratio"]) for r in rows if "domains" in r}
    rows = [r for r in rows if (r["name"], r["calib"], r["ratio"]) in done]
    runs = runs_to_do(args)
    for calib in args.calibs:
        calib_ids = None
        for ratio in args.ratios:
            for name, method, options in runs:
                if (name, calib, ratio) in done:
                    continue
                if calib_ids is None:
                    calib_ids = sample_blocks(tokenizer, DataSpec(calib, "calib"), args.calib_blocks, args.calib_len)
                options = with_groups_of(options, rows, calib, ratio)
                rows.append(run_one(model, name, method, options, calib, calib_ids, ratio, judge))
                write_results({**settings, "base": base, "rows": rows}, stem)
    write_results({**settings, "base": base, "rows": rows}, stem)
    print(format_table(summary(rows, base)))
    print(f"wrote {RESULTS / stem}.{{json,md,png}}")


def with_groups_of(options: dict[str, Any], rows: list[dict[str, Any]], calib: str, ratio: float) -> dict[str, Any]:
    """`groups=@NAME`: the blocks the run NAME flattened on this calibration and ratio, so that variants
    of the pruning share one pair search (the search is the costly, deterministic half)."""
    reference = options.get("groups")
    if not (isinstance(reference, str) and reference.startswith("@")):
        return options
    source = next((r for r in rows if (r["name"], r["calib"], r["ratio"]) == (reference[1:], calib, ratio)
                   and "domains" in r), None)
    if source is None:
        raise SystemExit(f"groups={reference}: run {reference[1:]} first (same calibration and ratio)")
    depth = source["details"]["layers_before"]
    pairs = {g[0]: g for g in source["details"]["flattened_groups"]}
    groups, index = [], 0
    while index < depth:
        groups.append(pairs.get(index, [index]))
        index += len(groups[-1])
    return options | {"groups": groups}


def run_one(base_model, name: str, method: str, options: dict[str, Any], calib: str, calib_ids: torch.Tensor,
            ratio: float, judge: Judge) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "method": method, "options": options, "calib": calib, "ratio": ratio}
    model = copy.deepcopy(base_model)
    began = time.perf_counter()
    try:
        report = compress(model, method, ratio=ratio, calib_ids=calib_ids, **options)
    except DepthkitError as err:
        return row | {"error": str(err)}
    seconds = time.perf_counter() - began
    row |= {"seconds": seconds, **judge.measure(model, zeroshot=calib == DEFAULT_CALIB, calib=calib),
            "details": report.details, "saveable": report.saveable}
    if note := report.shortfall():
        row["note"] = note
    print(f"{name} | {calib} | {ratio}: " + ", ".join(f"{d} {v['perplexity']:.2f}" for d, v in row["domains"].items()),
          flush=True)
    return row


if __name__ == "__main__":
    main()
