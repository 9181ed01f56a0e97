"""Every registered depth-compression method side by side on the same model, calibration and held-out text.

    .venv/bin/python benchmarks/compare_methods.py                    # 10/20/30 % of the blocks, all methods
    .venv/bin/python benchmarks/compare_methods.py --ratios 0.2 --methods shortgpt sleb
    .venv/bin/python benchmarks/compare_methods.py --quick            # smoke run: tiny data, one ratio

Calibration: one tensor of `--calib-blocks` x `--calib-len` tokens of Emma (calib split) for every
method (each method takes the subset it needs for its search). Held-out: 20 x 512 tokens of
Persuasion (heldout split; the splits never overlap). Prefill throughput: batch 1 x 512 tokens,
in the default dtype (bf16 where native, as recorded; else fp32), median of a few runs after a warm-up,
logits for the last position only (as in generation).
Writes benchmarks/results/compare_methods.{json,md,png} (`_quick` suffix for --quick), updated
after every run so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import depthkit  # noqa: E402
from depthkit.compress import compress, list_methods  # noqa: E402
from depthkit.compress.base import blocks_to_remove  # noqa: E402
from depthkit.compress.common import count_parameters, num_blocks  # noqa: E402
from depthkit.data import DataSpec, token_blocks, token_stream  # noqa: E402
from depthkit.errors import DepthkitError  # noqa: E402
from depthkit.evaluate.perplexity import perplexity  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.utils.precision import dtype_name  # noqa: E402

SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}  # as the recorded throughput notes say
RESULTS = Path(__file__).parent / "results"
CALIB = DataSpec("austen:emma", "calib")
HELDOUT = DataSpec("austen:persuasion", "heldout")
ORDER = ["base", "shortgpt", "sleb", "laco", "attn_drop", "flatten_unpruned", "flatten"]
COLUMNS = ["method", "removed", "depth", "held-out ppl", "params (M)", "effective (M)", "prefill tok/s",
           "speedup", "compress s", "note"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--calib-blocks", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=20, help="held-out windows of --eval-window tokens")
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--throughput-runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8x128 calibration, 4 windows, ratio 0.1")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the results file (same settings) and do only the missing ones")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.calib_blocks, args.calib_len, args.eval_windows, args.throughput_runs = [0.1], 8, 128, 4, 2
    return args


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - began


def paired_prefill(base, model, tokens: int, runs: int) -> dict[str, float]:
    """Prefill throughput of `model` and of `base`, timed alternately (after one warm-up each).

    The machine may be shared: alternating the two models exposes both to the same load, so
    their ratio (the speedup) is far steadier than two throughputs measured minutes apart.
    """
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    models = {"model": model} if model is base else {"model": model, "base": base}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs + 1):
        for name, timed in models.items():
            times[name].append(prefill_seconds(timed, ids))
    model_s = statistics.median(times["model"][1:])
    base_s = statistics.median(times["base"][1:]) if "base" in times else model_s
    return {"prefill tok/s": tokens / model_s, "base tok/s (paired)": tokens / base_s, "speedup": base_s / model_s}


def measure(model, base, heldout: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    params = count_parameters(model)
    ppl = perplexity(model, heldout, window=args.eval_window, max_tokens=args.eval_windows * args.eval_window,
                     batch_size=4, progress=False)
    return {"depth": num_blocks(model), "held-out ppl": ppl.perplexity, "params (M)": params["total"] / 1e6,
            "effective (M)": params["effective"] / 1e6,
            **paired_prefill(base, model, args.eval_window, args.throughput_runs)}


def run_one(base, method: str, ratio: float, calib: torch.Tensor, heldout: torch.Tensor, args) -> dict[str, Any]:
    model = copy.deepcopy(base)
    try:
        report = compress(model, method, ratio=ratio, calib_ids=calib)
    except DepthkitError as err:
        return {"method": method, "ratio": ratio, "removed": blocks_to_remove(num_blocks(base), ratio),
                "note": f"error: {err}"}
    row = {"method": method, "ratio": ratio, "removed": report.blocks_requested, **measure(model, base, heldout, args),
           "compress s": report.seconds, "note": _note(report)}
    row["card"] = report.to_dict()
    return row


def _note(report) -> str:
    if report.details.get("warning"):
        return "attention zeroed: depth/speed unchanged"
    return "" if report.saveable else "not a standard checkpoint (wide blocks)"


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], stem: str) -> None:
    rank = {m: i for i, m in enumerate(ORDER)}
    rows.sort(key=lambda r: (r["ratio"], rank.get(r["method"], len(ORDER)), r["method"]))
    for row in rows:
        if row["method"] == "base":  # the reference itself (older result files paired it with itself)
            row.update({"speedup": 1.0, "base tok/s (paired)": row["prefill tok/s"]})
    write_json(RESULTS / f"{stem}.json", {**meta, "rows": rows})
    table = format_table([{c: r.get(c, "") for c in COLUMNS} for r in rows], COLUMNS)
    lines = [f"# Depth-compression methods compared ({meta['model']})", "",
             f"- calibration: {meta['calibration']}", f"- held-out: {meta['heldout']}",
             f"- throughput: {meta['throughput']}; speedup = paired base time / model time",
             f"- machine: {meta['machine']}", "", table, "",
             "`effective` leaves out all-zero weight tensors (attention-only drop zeroes attention sublayers",
             "instead of removing them: a plain checkpoint cannot drop attention alone, so it is neither",
             "smaller nor faster). `flatten_unpruned` keeps double-width blocks: an upper bound, not saveable.",
             "Throughput on a shared CPU is noisy: compare the paired `speedup` column, not tok/s across rows.", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    plot(rows, RESULTS / f"{stem}.png", meta["model"])


def previous_rows(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same model, data and throughput settings (else none)."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    same = all(previous.get(key) == meta[key] for key in ("model", "dtype", "calibration", "heldout", "throughput"))
    if not same:
        print(f"--resume: {path} was measured with other settings; starting afresh")
        return []
    meta["ratios"] = sorted(set(previous.get("ratios", [])) | set(meta["ratios"]))
    meta["methods"] = [m for m in ORDER[1:] if m in set(previous.get("methods", [])) | set(meta["methods"])]
    return [row for row in previous["rows"] if "error" not in row.get("note", "")]


def plot(rows: list[dict[str, Any]], path: Path, model: str) -> None:
    """Perplexity vs removed blocks; a collapsed method (ppl above `ceiling`) is drawn at the top edge, labelled,
    so it does not squash every other curve into the bottom of the chart."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in rows if r["method"] == "base"), None)
    ceiling = 10 * base["held-out ppl"] if base else float("inf")
    if base:
        ax.axhline(base["held-out ppl"], color="grey", linestyle="--", label=f"base ({base['depth']} blocks)")
    for method in ORDER[1:] + sorted({r["method"] for r in rows} - set(ORDER)):
        points = sorted((r["removed"], r["held-out ppl"]) for r in rows
                        if r["method"] == method and "held-out ppl" in r)
        if not points:
            continue
        line, = ax.plot(*zip(*[(x, min(y, ceiling)) for x, y in points]), marker="o", label=method)
        for x, y in points:
            if y > ceiling:
                ax.annotate(f"{method} {y:.2g}", (x, ceiling), textcoords="offset points", xytext=(4, -12),
                            fontsize=7, color=line.get_color())
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("blocks removed (attn_drop: 2 attention sublayers per block)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{model}: depth compression, held-out perplexity")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)  # "auto": bf16 where the CPU multiplies it natively, else fp32
    registered = [m["method"] for m in list_methods()]
    methods = args.methods or [m for m in ORDER[1:] if m in registered] + sorted(set(registered) - set(ORDER))
    unknown = sorted(set(methods) - set(registered))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {registered}")
    calib = token_blocks(tokenizer, CALIB, args.calib_blocks, args.calib_len)
    heldout = token_stream(tokenizer, HELDOUT)
    meta = {
        "model": args.model, "dtype": dtype_name(base.dtype), "depthkit_version": depthkit.__version__,
        "calibration": f"{CALIB.describe()}, {args.calib_blocks} x {args.calib_len} tokens "
                       "(the same tensor for every method)",
        "heldout": f"{HELDOUT.describe()}, {args.eval_windows} x {args.eval_window} tokens",
        "throughput": f"prefill 1 x {args.eval_window} tokens, {SHORT_DTYPES.get(base.dtype, base.dtype)}, "
                      f"median of {args.throughput_runs} runs",
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "ratios": args.ratios, "methods": methods,
    }
    stem = "compare_methods_quick" if args.quick else "compare_methods"
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = previous_rows(RESULTS / f"{stem}.json", meta) if args.resume else []
    done = {(r["method"], r["ratio"]) for r in rows}
    if ("base", 0.0) not in done:
        rows.insert(0, {"method": "base", "ratio": 0.0, "removed": 0, **measure(base, base, heldout, args),
                        "compress s": 0.0})
        write_results(rows, meta, stem)
    runs = [(ratio, method) for ratio in args.ratios for method in methods if (method, ratio) not in done]
    for ratio, method in tqdm(runs, desc="compare", unit="run"):
        tqdm.write(f"{method} at ratio {ratio} ...")
        rows.append(run_one(base, method, ratio, calib, heldout, args))
        tqdm.write(format_table([{c: rows[-1].get(c, "") for c in COLUMNS}], COLUMNS))
        write_results(rows, meta, stem)
    print(format_table([{c: r.get(c, "") for c in COLUMNS} for r in rows], COLUMNS))
    print(f"wrote {RESULTS / stem}.json, .md, .png")


if __name__ == "__main__":
    main()
