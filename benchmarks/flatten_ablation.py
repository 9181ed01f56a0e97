"""FlattenGPT ablation on SmolLM2-135M-Instruct: 30 -> 24 blocks, held-out perplexity per variant.

Setting of the spec (docs: /work/shared/specs/flattengpt.md): pairs chosen on 8 x 256 tokens of
Emma (calib split), least squares on 64 x 256 tokens of Mansfield Park (calib split), perplexity
on 20 x 512 tokens of Persuasion (heldout split), bf16 model on CPU.

    .venv/bin/python benchmarks/flatten_ablation.py            # all variants (~15 min on 2 cores)
    .venv/bin/python benchmarks/flatten_ablation.py --variants default,unpruned

Writes benchmarks/results/flatten_ablation.{json,md}. Each variant starts from a fresh copy of the
model; the pair selection of each selection criterion runs once and is shared by the variants
(`--reuse-selection` takes it from the previous results file; `--keep-rows` keeps the rows of
variants not rerun, to fill the table in several shorter runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from depthkit.compress.flatten import FlattenOptions, flatten_gpt, select_groups
from depthkit.data import DataSpec, token_blocks, token_stream
from depthkit.evaluate.perplexity import perplexity
from depthkit.models.loading import load_model
from depthkit.utils.io import format_table, write_json

RESULTS = Path(__file__).parent / "results"
JSON_PATH = RESULTS / "flatten_ablation.json"
NUM_REMOVE = 6  # 30 -> 24 blocks (20%)

# name -> (selection, options for the pruning stage, pruned?)
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


def data(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    selection = token_blocks(tokenizer, DataSpec("austen:emma", "calib"), 8, 256)
    fit = token_blocks(tokenizer, DataSpec("austen:mansfieldpark", "calib"), 64, 256)
    heldout = token_stream(tokenizer, DataSpec("austen:persuasion", "heldout"))
    return selection, fit, heldout


def heldout_ppl(model, stream: torch.Tensor) -> float:
    return round(perplexity(model, stream, window=512, batch_size=4, max_tokens=20 * 512, progress=False).perplexity, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--reuse-selection", action="store_true",
                        help="reuse the pair selections (and their timings) stored in the previous results JSON")
    parser.add_argument("--keep-rows", action="store_true", help="keep the previous JSON's rows of variants not rerun")
    args = parser.parse_args()
    names = args.variants.split(",")
    previous = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    torch.manual_seed(0)
    base, tokenizer = load_model(dtype="bfloat16")
    selection_ids, fit_ids, heldout = data(tokenizer)
    rows: list[dict] = [{"variant": "original (30 blocks)", "ppl": heldout_ppl(base, heldout)}]
    selections: dict[str, tuple[list[list[int]], float]] = {}
    if args.reuse_selection:
        selections = {k: (v["groups"], v["seconds"]) for k, v in previous.get("selections", {}).items()}
    records = previous.get("variants", {}) if args.keep_rows else {}
    for name in names:
        selection, overrides, prune = VARIANTS[name]
        if selection not in selections:
            began = time.perf_counter()
            groups, log = select_groups(base, selection_ids, NUM_REMOVE, selection)
            selections[selection] = (groups, time.perf_counter() - began)
            print(f"selection {selection}: {log}", flush=True)
        groups, select_seconds = selections[selection]
        model = copy.deepcopy(base)
        options = FlattenOptions(selection=selection, groups=groups, **overrides)
        details = flatten_gpt(model, selection_ids, fit_ids, NUM_REMOVE, options, prune=prune)
        row = {
            "variant": name,
            "ppl": heldout_ppl(model, heldout),
            "selection": selection,
            "criterion": options.criterion if prune else "-",
            "target": options.target if prune else "-",
            "ridge": options.ridge if prune else "-",
            "seconds_select": round(select_seconds, 1),
            "seconds_prune": round(details["seconds_prune"], 1),
            "pairs": " ".join(f"{g[0]}+{g[-1]}" for g in details["flattened_groups"]),
        }
        records[name] = {"row": row, "options": dataclasses.asdict(options), "blocks": details["blocks"]}
        print(format_table([row]), flush=True)
        write_results(rows + [records[n]["row"] for n in VARIANTS if n in records], selections, records)


def write_results(rows: list[dict], selections: dict, records: dict) -> None:
    """Write JSON + markdown (after every variant, so a long run keeps what it measured)."""
    setting = {
        "model": "SmolLM2-135M-Instruct (bf16, CPU)",
        "blocks": "30 -> 24",
        "selection_data": "austen:emma calib, 8 x 256 tokens",
        "fit_data": "austen:mansfieldpark calib, 64 x 256 tokens",
        "heldout": "austen:persuasion heldout, 20 x 512 tokens",
        "torch_threads": torch.get_num_threads(),
        # The 2 cores are shared: timings depend on the machine's load while this ran.
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    stored = {k: {"groups": g, "seconds": t} for k, (g, t) in selections.items()}
    write_json(JSON_PATH, {"setting": setting, "rows": rows, "selections": stored, "variants": records})
    lines = ["# FlattenGPT ablation (SmolLM2-135M-Instruct, 30 -> 24 blocks)", ""]
    lines += [f"- {k}: {v}" for k, v in setting.items()] + ["", format_table(rows), ""]
    (RESULTS / "flatten_ablation.md").write_text("\n".join(lines))

if __name__ == "__main__":
    main()
