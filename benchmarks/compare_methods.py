"""Every depth- and width-compression method side by side: same model, calibration and held-out text.

    .venv/bin/python benchmarks/compare_methods.py                    # 20 % and 30 %, every method and variant
    .venv/bin/python benchmarks/compare_methods.py --ratios 0.2 --methods shortgpt sleb
    .venv/bin/python benchmarks/compare_methods.py --quick            # smoke run: tiny data, one ratio

Calibration: `--calib-blocks` x `--calib-len` tokens sampled over depthkit's default mixture (every
offline domain), the same tensor for every method. Held-out: `--eval-blocks` x `--eval-len` tokens of
every domain's heldout split (never overlapping the calibration), with the original's predictions:
perplexity per domain, their geometric mean relative to the original, top-1 agreement.

Variants beside the registered methods (`VARIANTS`): LaCo with the released code's merge (`laco_drop`)
and FlattenGPT's paper recipe (`flatten_paper`). Attention drop removes attention sublayers one for one
and is timed on depthkit's runtime, which skips them (`skip_zeroed_attention`).

Speed, measured on this machine's CPU: prefill (1 x `--eval-len` tokens, last logits only) and greedy
decoding (1 x 128-token prompt, 32 new tokens on the KV cache), compressed and original model timed
alternately, `--throughput-runs` times each after a warm-up: the speed-up is the ratio of medians.
A speed-up above what the model's arithmetic allows (`speed_bound`: the original's multiply-adds per
token over the compressed model's) is noise, not a finding: it is re-measured up to twice and, if it
stays implausible, flagged in the table instead of reported.

Writes benchmarks/results/compare_methods.{json,md,png} (`_quick` for --quick; `--stem` names another
model's or setting's files), updated after every
run (`--resume` keeps the runs already there with the same settings).
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
from depthkit.data import DataSpec  # noqa: E402
from depthkit.data.blocks import sample_blocks  # noqa: E402
from depthkit.data.corpora import DEFAULT_CALIB, MIX_COMPONENTS  # noqa: E402
from depthkit.errors import DepthkitError  # noqa: E402
from depthkit.evaluate.behaviour import BehaviourSuite  # noqa: E402
from depthkit.evaluate.report import geo_mean  # noqa: E402
from depthkit.evaluate.speed import time_decode  # noqa: E402
from depthkit.models.adapters import get_adapter  # noqa: E402
from depthkit.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from depthkit.models.skipping import skip_zeroed_attention  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402
from depthkit.utils.precision import dtype_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DOMAINS = MIX_COMPONENTS
# name -> (registered method, options): the variants a comparison must show beside the defaults.
VARIANTS = {"laco_drop": ("laco", {"merge": "drop"}), "flatten_paper": ("flatten", {"preset": "paper"})}
ORIGINAL = "original"  # the uncompressed model's row, named as in every other benchmark
ORDER = [ORIGINAL, "shortgpt", "sleb", "laco", "laco_drop", "attn_drop", "width", "minitron", "flatten_unpruned",
         "flatten_paper", "flatten"]
COLUMNS = ["method", "removed", "depth", "params (M)", *DOMAINS, "ppl / original", "top-1 agreement",
           "prefill speedup", "decode speedup", "bound", "compress s", "note"]
PROMPT_LEN, NEW_TOKENS = 128, 32
PLAUSIBLE = 1.05  # a measured speed-up may exceed the arithmetic bound by this much (timing spread)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"registered methods or variants ({', '.join(VARIANTS)}); default: all")
    parser.add_argument("--calib-blocks", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks per domain")
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--throughput-runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8x128 calibration, 2x128 per domain, 0.1")
    parser.add_argument("--stem", default=None,
                        help="results file name (default compare_methods, or compare_methods_quick)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the results file (same settings) and do only the missing ones")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.calib_blocks, args.calib_len = [0.1], 8, 128
        args.eval_blocks, args.eval_len, args.throughput_runs = 2, 128, 2
    return args


def runs(requested: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, method, options) of every run: registered methods with their defaults, then the variants."""
    registered = [m["method"] for m in list_methods()]
    known = registered + list(VARIANTS)
    names = requested or [n for n in ORDER[1:] if n in known] + sorted(set(known) - set(ORDER))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {registered}; variants: {list(VARIANTS)}")
    return [(name, *VARIANTS.get(name, (name, {}))) for name in names]


# -- speed ---------------------------------------------------------------------------------------
def multiply_adds(model, context: float, with_head: bool) -> float:
    """Multiply-adds per token: every block's projections, attention scores over `context` positions
    (2 x heads x head_dim per position, only where attention runs), and the LM head if asked."""
    adapter = get_adapter(model)
    total = 0.0
    for layer in adapter.layers(model):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear) and bool(m.weight.detach().any())]
        total += sum(m.weight.numel() for m in linears)
        query = [m for name, m in layer.named_modules() if name == adapter.layout.query]
        if query and bool(query[0].weight.detach().any()):
            total += 2 * context * query[0].out_features
    if with_head:
        total += adapter.lm_head(model).weight.numel()
    return total


def speed_bound(base, model, prompt: int) -> dict[str, float]:
    """The largest speed-up the arithmetic allows: prefill (causal: half the prompt on average, no
    vocabulary projection but the last position's) and decoding (the prompt plus half the new tokens)."""
    return {
        "prefill": multiply_adds(base, prompt / 2, False) / multiply_adds(model, prompt / 2, False),
        "decode": multiply_adds(base, PROMPT_LEN + NEW_TOKENS / 2, True)
        / multiply_adds(model, PROMPT_LEN + NEW_TOKENS / 2, True),
    }


@torch.no_grad()
def paired_times(base, model, tokens: int, runs_: int) -> dict[str, float]:
    """Median prefill and decode times of `model` and `base`, timed alternately after a warm-up each,
    so that both see the same load on a shared machine; speed-ups are ratios of medians."""
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=generator)
    prompt = torch.randint(0, base.config.vocab_size, (1, PROMPT_LEN), generator=generator)
    models = {"model": model, "base": base}
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    for _ in range(runs_ + 1):
        for name, timed in models.items():
            began = time.perf_counter()
            timed(input_ids=prefill_ids, logits_to_keep=1)
            times[name]["prefill"].append(time.perf_counter() - began)
            times[name]["decode"].append(time_decode(timed, prompt, NEW_TOKENS, {"logits_to_keep": 1})[1])
    median = {name: {k: statistics.median(v[1:]) for k, v in kinds.items()} for name, kinds in times.items()}
    return {"prefill tok/s": tokens / median["model"]["prefill"],
            "decode tok/s": NEW_TOKENS / median["model"]["decode"],
            "prefill speedup": median["base"]["prefill"] / median["model"]["prefill"],
            "decode speedup": median["base"]["decode"] / median["model"]["decode"]}


def measured_speed(base, model, args: argparse.Namespace) -> dict[str, Any]:
    """Paired speed-ups, re-measured while either exceeds its bound; still implausible: flagged."""
    bound = speed_bound(base, model, args.eval_len)
    attempts = 0
    while True:
        speed, attempts = paired_times(base, model, args.eval_len, args.throughput_runs), attempts + 1
        implausible = [k for k in ("prefill", "decode") if speed[f"{k} speedup"] > PLAUSIBLE * bound[k]]
        if not implausible or attempts == 3:
            return speed | {"bound": bound, "implausible": implausible, "speed attempts": attempts}


# -- one run -------------------------------------------------------------------------------------
def measure(model, base, suite: BehaviourSuite, args: argparse.Namespace) -> dict[str, Any]:
    behaviour = suite.measure(model)
    params = count_parameters(model)
    return {"depth": num_blocks(model), "params (M)": params["effective"] / 1e6,
            "domains": behaviour["domains"], "top-1 agreement": behaviour["mean_top1_agreement"],
            **measured_speed(base, model, args)}


def run_one(base, name: str, method: str, options: dict[str, Any], ratio: float, calib: torch.Tensor,
            suite: BehaviourSuite, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(base)
    row: dict[str, Any] = {"method": name, "registered": method, "options": options, "ratio": ratio,
                           "removed": blocks_to_remove(num_blocks(base), ratio)}
    try:
        report = compress(model, method, ratio=ratio, calib_ids=calib, **options)
    except DepthkitError as err:
        return row | {"note": f"error: {err}"}
    skipped = skip_zeroed_attention(model)  # attention drop: timed as depthkit runs it
    row |= measure(model, base, suite, args) | {"compress s": report.seconds, "card": report.to_dict()}
    row["note"] = _note(report, skipped)
    return row


def _note(report, skipped: list[int]) -> str:
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} attention sublayers skipped")
    if shortfall := report.shortfall():
        notes.append(shortfall)
    if not report.saveable:
        notes.append("not a standard checkpoint (wide blocks)")
    return "; ".join(notes)


# -- results -------------------------------------------------------------------------------------
def cells(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One table row: perplexities, their geometric mean over the original's, speed-ups (or the flag)."""
    if "domains" not in row:
        return {c: row.get(c, "") for c in COLUMNS}
    ppl = {d: row["domains"][d]["perplexity"] for d in DOMAINS}
    relative = geo_mean([ppl[d] / base["domains"][d]["perplexity"] for d in DOMAINS])
    speed = {}
    for kind in ("prefill", "decode"):
        value = row[f"{kind} speedup"]
        speed[f"{kind} speedup"] = f"noise ({value:.2f})" if kind in row.get("implausible", []) else f"{value:.2f}"
    bound = row.get("bound", {})
    return {"method": row["method"], "removed": row["removed"], "depth": row["depth"],
            "params (M)": row["params (M)"], **ppl, "ppl / original": relative,
            "top-1 agreement": row["top-1 agreement"], **speed,
            "bound": f"{bound.get('prefill', 1):.2f} / {bound.get('decode', 1):.2f}",
            "compress s": row.get("compress s", 0.0), "note": row.get("note", "")}


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], stem: str) -> None:
    rank = {m: i for i, m in enumerate(ORDER)}
    rows.sort(key=lambda r: (r["ratio"], rank.get(r["method"], len(ORDER)), r["method"]))
    write_json(RESULTS / f"{stem}.json", {**meta, "rows": rows})
    base = next(r for r in rows if r["method"] == ORIGINAL)
    table = format_table([cells(r, base) for r in rows], COLUMNS)
    lines = [f"# Compression methods compared ({meta['model']})", "",
             f"- calibration: {meta['calibration']}", f"- held-out: {meta['heldout']}",
             f"- speed: {meta['speed']}", f"- machine: {meta['machine']}", "", table, "",
             "`ppl / original`: geometric mean over the four domains of perplexity over the original's. "
             "`params`: effective parameters (all-zero tensors left out). Speed-ups are paired (compressed and "
             "original timed alternately); `bound` is prefill / decode multiply-adds of the original over the "
             "compressed model, the most a speed-up can be: a measured value above it (x1.05) after three tries is "
             "printed as `noise`. `laco` stops at its threshold (the paper's 0.65) and reports the depth it reached; "
             "`laco_drop` is the released code's merge. `attn_drop` drops one attention sublayer per requested "
             "block and is timed on depthkit's runtime, which skips them. `width` and `minitron` keep every block "
             "at the depth cut's parameter count. `flatten_unpruned` keeps double-width blocks: an upper bound.", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    plot(rows, base, RESULTS / f"{stem}.png", meta["model"])


def previous_rows(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same model, data and speed settings (else none)."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    if not all(previous.get(key) == meta[key] for key in ("model", "dtype", "calibration", "heldout", "speed")):
        print(f"--resume: {path} was measured with other settings; starting afresh")
        return []
    return [row for row in previous["rows"] if "error" not in row.get("note", "")]


def plot(rows: list[dict[str, Any]], base: dict[str, Any], path: Path, model: str) -> None:
    """Quality (ppl / original, log) against measured prefill speed-up, one marker per method and ratio."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in ORDER[1:] + sorted({r["method"] for r in rows} - set(ORDER)):
        points = [(r["prefill speedup"], cells(r, base)["ppl / original"], r["ratio"]) for r in rows
                  if r["method"] == name and "domains" in r and "prefill" not in r.get("implausible", [])]
        if points:
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle=":", label=name)
            for x, y, ratio in points:
                ax.annotate(f"{ratio:.0%}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=line.get_color())
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
    ax.set_xlabel("prefill speed-up over the original (paired, measured)")
    ax.set_ylabel("held-out perplexity / original (geo-mean of domains, log)")
    ax.set_title(f"{model}: quality against speed (labels: share of the depth removed)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)  # "auto": bf16 where the CPU multiplies it natively, else fp32
    todo = runs(args.methods)
    calib = sample_blocks(tokenizer, DataSpec(DEFAULT_CALIB, "calib"), args.calib_blocks, args.calib_len)
    suite = BehaviourSuite(base, tokenizer, list(DOMAINS), "heldout", blocks=args.eval_blocks,
                           block_len=args.eval_len, chat=False)
    meta = {
        "model": args.model, "dtype": dtype_name(base.dtype), "depthkit_version": depthkit.__version__,
        "calibration": f"{DEFAULT_CALIB} (calib splits), {args.calib_blocks} x {args.calib_len} tokens, the same "
                       "tensor for every method",
        "heldout": f"{args.eval_blocks} x {args.eval_len} tokens of each of {', '.join(DOMAINS)} (heldout splits)",
        "speed": f"prefill 1 x {args.eval_len}, decode 1 x {PROMPT_LEN} + {NEW_TOKENS} new tokens, "
                 f"{dtype_name(base.dtype)}, median of {args.throughput_runs} paired runs",
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
    }
    stem = args.stem or ("compare_methods_quick" if args.quick else "compare_methods")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = previous_rows(RESULTS / f"{stem}.json", meta) if args.resume else []
    done = {(r["method"], r["ratio"]) for r in rows}
    if (ORIGINAL, 0.0) not in done:
        rows.insert(0, {"method": ORIGINAL, "ratio": 0.0, "removed": 0, **measure(base, base, suite, args)})
        write_results(rows, meta, stem)
    pending = [(ratio, run) for ratio in args.ratios for run in todo if (run[0], ratio) not in done]
    for ratio, (name, method, options) in tqdm(pending, desc="compare", unit="run"):
        tqdm.write(f"{name} at ratio {ratio} ...")
        rows.append(run_one(base, name, method, options, ratio, calib, suite, args))
        write_results(rows, meta, stem)
        tqdm.write(format_table([cells(rows[-1], rows[0])], COLUMNS))
    base_row = next(r for r in rows if r["method"] == ORIGINAL)
    print(format_table([cells(r, base_row) for r in rows], COLUMNS))
    print(f"wrote {RESULTS / stem}.json, .md, .png")


if __name__ == "__main__":
    main()
