"""FlattenGPT ablation on SmolLM2-135M-Instruct: 30 -> 24 blocks, held-out perplexity per variant.

Setting of the spec (docs: /work/shared/specs/flattengpt.md): pairs chosen on 8 x 256 tokens of
Emma (calib split), least squares on 64 x 256 tokens of Mansfield Park (calib split), perplexity
on 20 x 512 tokens of Persuasion (heldout split), bf16 model on CPU.

    .venv/bin/python benchmarks/flatten_ablation.py            # all variants (~15 min on 2 cores)
    .venv/bin/python benchmarks/flatten_ablation.py --variants default,unpruned
    .venv/bin/python benchmarks/flatten_ablation.py --quick --variants unpruned,default,ridge_1e-2   # smoke run

Writes benchmarks/results/flatten_ablation.{json,md} (`_quick` for --quick: 2 x 128 selection, 8 x
128 fitting, 4 x 256 held-out tokens). Everything goes through the library's plan API: the search of
each pair selection runs once (the flatten method's `search`, on the selection tokens) and its plan
is applied to a fresh copy of the model per variant (`depthkit.compress(copy, plan=plan,
calib_ids=fit tokens, **pruning options)`: the pruning options are apply-only, so every variant
of one selection flattens the same pairs; `flatten_unpruned` applies the same plan without
pruning). `--reuse-selection` takes the plans from the previous results file (a selection stored
by earlier versions of this script as groups only becomes the library's explicit-`groups` plan);
`--keep-rows` keeps the rows of variants not rerun, to fill the table in several shorter runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from depthkit.compress import CompressionPlan, compress, get_method
from depthkit.compress.flatten import groups_of
from depthkit.data import DataSpec, token_blocks, token_stream
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import DEFAULT_MODEL, load_model
from depthkit.models.runner import as_source
from depthkit.utils.io import format_table, write_json

RESULTS = Path(__file__).parent / "results"
NUM_REMOVE = 6  # 30 -> 24 blocks (20%)

# sequences x tokens of the selection and fitting text; held-out windows x tokens
SIZES = {
    "full": {"selection": (8, 256), "fit": (64, 256), "heldout": (20, 512)},
    "quick": {"selection": (2, 128), "fit": (8, 128), "heldout": (4, 256)},
}

# name -> (selection, options for the pruning stage (apply-only), pruned?)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "unpruned": ("greedy", {}, False),
    "default": ("greedy", {}, True),  # ols selection, sequential target, error propagation
    "magnitude": ("greedy", {"criterion": "magnitude"}, True),
    "nystrom": ("greedy", {"criterion": "nystrom"}, True),
    "parallel_target": ("greedy", {"target": "parallel"}, True),
    "original_target": ("greedy", {"target": "original"}, True),
    "ridge_1e-2": ("greedy", {"ridge": 1e-2}, True),
    "ridge_1e-4": ("greedy", {"ridge": 1e-4}, True),
    "similarity_selection": ("similarity", {}, True),
}


def data(tokenizer, sizes: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    selection = token_blocks(tokenizer, DataSpec("austen:emma", "calib"), *sizes["selection"])
    fit = token_blocks(tokenizer, DataSpec("austen:mansfieldpark", "calib"), *sizes["fit"])
    heldout = token_stream(tokenizer, DataSpec("austen:persuasion", "heldout"))
    return selection, fit, heldout


def heldout_ppl(model, stream: torch.Tensor, sizes: dict) -> float:
    windows, window = sizes["heldout"]
    return round(perplexity(model, stream, window=window, batch_size=4, max_tokens=windows * window,
                            progress=False).perplexity, 2)


def search(base, selection: str, selection_ids: torch.Tensor) -> CompressionPlan:
    """The flatten method's search alone (pairs chosen on the selection tokens; the model is only read)."""
    plan = get_method("flatten", selection=selection).search(as_source(base), selection_ids, NUM_REMOVE)
    plan.model = DEFAULT_MODEL
    return plan


def stored_plans(previous: dict, base, selection_ids: torch.Tensor) -> dict[str, tuple[CompressionPlan, float]]:
    """The previous results' plans; a selection stored as groups only (earlier versions of this
    script) becomes the library's plan of those explicit groups (same pairs, no search)."""
    plans = {}
    for selection, stored in previous.get("selections", {}).items():
        if "plan" in stored:
            plan = CompressionPlan.from_dict(stored["plan"], f"stored {selection} plan")
        else:
            method = get_method("flatten", selection=selection, groups=stored["groups"])
            plan = method.search(as_source(base), selection_ids, NUM_REMOVE)
            plan.model = DEFAULT_MODEL
        plans[selection] = (plan, stored["seconds"])
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--reuse-selection", action="store_true",
                        help="reuse the pair selections (plans, and their timings) stored in the previous results JSON")
    parser.add_argument("--keep-rows", action="store_true", help="keep the previous JSON's rows of variants not rerun")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2x128 selection, 8x128 fitting, 4x256 held-out tokens (writes *_quick)")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    sizes = SIZES["quick" if args.quick else "full"]
    stem = "flatten_ablation_quick" if args.quick else "flatten_ablation"
    json_path = RESULTS / f"{stem}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    torch.manual_seed(0)
    base, tokenizer = load_model(dtype="bfloat16")
    selection_ids, fit_ids, heldout = data(tokenizer, sizes)
    rows: list[dict] = [{"variant": "original (30 blocks)", "ppl": heldout_ppl(base, heldout, sizes)}]
    plans = stored_plans(previous, base, selection_ids) if args.reuse_selection else {}
    records = previous.get("variants", {}) if args.keep_rows else {}
    for name in names:
        selection, overrides, prune = VARIANTS[name]
        if selection not in plans:
            began = time.perf_counter()
            plan = search(base, selection, selection_ids)
            plans[selection] = (plan, time.perf_counter() - began)
            print(f"selection {selection}: {[(step['blocks'], step.get('score')) for step in plan.steps]}", flush=True)
        plan, select_seconds = plans[selection]
        model = copy.deepcopy(base)  # the plan's pairs, fitted on the fitting tokens with this variant's options
        report = compress(model, "flatten" if prune else "flatten_unpruned", target_layers=plan.num_layers - NUM_REMOVE,
                          calib_ids=fit_ids, plan=plan, **overrides)
        details, options = report.details, report.details["options"]
        row = {
            "variant": name,
            "ppl": heldout_ppl(model, heldout, sizes),
            "selection": selection,
            "criterion": options["criterion"] if prune else "-",
            "target": options["target"] if prune else "-",
            "ridge": options["ridge"] if prune else "-",
            "seconds_select": round(select_seconds, 1),
            "seconds_prune": round(details["seconds_prune"], 1),
            "pairs": " ".join(f"{g[0]}+{g[-1]}" for g in details["flattened_groups"]),
        }
        records[name] = {"row": row, "options": options, "blocks": details["blocks"]}
        print(format_table([row]), flush=True)
        write_results(json_path, sizes, rows + [records[n]["row"] for n in VARIANTS if n in records], plans, records)


def write_results(json_path: Path, sizes: dict, rows: list[dict], plans: dict, records: dict) -> None:
    """Write JSON + markdown (after every variant, so a long run keeps what it measured)."""
    (sel_n, sel_len), (fit_n, fit_len), (ho_n, ho_len) = sizes["selection"], sizes["fit"], sizes["heldout"]
    setting = {
        "model": "SmolLM2-135M-Instruct (bf16, CPU)",
        "blocks": "30 -> 24",
        "selection_data": f"austen:emma calib, {sel_n} x {sel_len} tokens",
        "fit_data": f"austen:mansfieldpark calib, {fit_n} x {fit_len} tokens",
        "heldout": f"austen:persuasion heldout, {ho_n} x {ho_len} tokens",
        "torch_threads": torch.get_num_threads(),
        # The 2 cores are shared: timings depend on the machine's load while this ran.
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    # `groups` (every group of original blocks, in order) as earlier versions stored it; `plan` the search's plan
    stored = {k: {"groups": groups_of(plan.steps, plan.num_layers), "seconds": seconds, "plan": plan.to_dict()}
              for k, (plan, seconds) in plans.items()}
    write_json(json_path, {"setting": setting, "rows": rows, "selections": stored, "variants": records})
    lines = ["# FlattenGPT ablation (SmolLM2-135M-Instruct, 30 -> 24 blocks)", ""]
    lines += [f"- {k}: {v}" for k, v in setting.items()] + ["", format_table(rows), ""]
    json_path.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
