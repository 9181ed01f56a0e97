"""Side-by-side report of a base model and its compressed or looped versions.

Inputs are the JSON results the evaluation commands write (`depthkit eval ppl|zeroshot|speed
--json`) and the behaviour against the base (`depthkit report` computes it), merged per model into
a record `{"label", "model", "parameters", "layers", "perplexity", "zeroshot", "speed",
"behaviour"}` (each part optional). The report compares every record with
the base: perplexity, each task's headline accuracy, their average and the fraction of the base's
average retained, parameters, and speed ratios (model tokens/s over base tokens/s, so > 1 is
faster). It writes report.md, report.json and bar charts (accuracy.png, perplexity.png, speed.png).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from depthkit.errors import DepthkitError
from depthkit.utils.io import format_table, write_json

KINDS = ("perplexity", "zeroshot", "speed", "behaviour")


def _kind(payload: dict) -> str:
    """Which evaluation a JSON result holds (results written before `kind` existed have a `perplexity` field)."""
    if payload.get("kind") in (*KINDS, "model"):
        return payload["kind"]
    if "perplexity" in payload and "tokens_scored" in payload:
        return "perplexity"
    raise DepthkitError(f"not a depthkit evaluation result (kind: {payload.get('kind')!r})")


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DepthkitError(f"cannot read result file {path}: {err}") from err
    if not isinstance(payload, dict):
        raise DepthkitError(f"{path} is not a depthkit evaluation result")
    return payload


def merge_results(payloads: list[dict], label: str | None = None) -> dict:
    """One model's record from its evaluation results (or a record written by an earlier report)."""
    record: dict = {"kind": "model", "label": label, "model": None, "parameters": None, "layers": None}
    record.update(dict.fromkeys(KINDS))
    for payload in payloads:
        kind = _kind(payload)
        parts = {k: payload.get(k) for k in KINDS} if kind == "model" else {kind: payload}
        for name, part in parts.items():
            if part is None:
                continue
            if record[name] is not None:
                raise DepthkitError(f"two {name} results given for the same model ({record['model']})")
            record[name] = part
        for key in ("label", "model", "parameters", "layers"):
            record[key] = record[key] if record[key] is not None else payload.get(key)
    record["label"] = record["label"] or record["model"] or "model"
    return record


# -- comparison ----------------------------------------------------------------------------------
def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def geo_mean(values: list[float]) -> float | None:
    """Geometric mean (None for no values): the average of ratios such as speed-ups or perplexity ratios."""
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _accuracies(record: dict) -> dict[str, float]:
    zs = record.get("zeroshot") or {}
    return {task: score["accuracy"] for task, score in zs.get("tasks", {}).items()}


def _prefill_tps(record: dict) -> dict[tuple[int, int], float]:
    speed = record.get("speed") or {}
    return {(p["batch_size"], p["seq_len"]): p["tokens_per_s"]["median"] for p in speed.get("prefill", [])}


def _decode_tps(record: dict) -> dict[int, float]:
    speed = record.get("speed") or {}
    return {d["batch_size"]: d["tokens_per_s"]["median"] for d in speed.get("decode", [])}


def _ttft(record: dict) -> float | None:
    decode = (record.get("speed") or {}).get("decode", [])
    return decode[0]["time_to_first_token_s"]["median"] if decode else None


def summarize(record: dict, base: dict) -> dict:
    """The report's row for `record`, compared with `base` (ratios are None where a figure is missing)."""
    acc, base_acc = _accuracies(record), _accuracies(base)
    shared = [t for t in acc if t in base_acc]
    average = sum(acc[t] for t in shared) / len(shared) if shared else None
    base_average = sum(base_acc[t] for t in shared) / len(shared) if shared else None
    prefill, base_prefill = _prefill_tps(record), _prefill_tps(base)
    decode, base_decode = _decode_tps(record), _decode_tps(base)
    return {
        "label": record["label"],
        "parameters": record.get("parameters"),
        "parameters_ratio": _ratio(record.get("parameters"), base.get("parameters")),
        "layers": record.get("layers"),
        "perplexity": (record.get("perplexity") or {}).get("perplexity"),
        "accuracy": acc,
        "average_accuracy": average,
        "retained": _ratio(average, base_average),
        "prefill_speedup": geo_mean([prefill[k] / base_prefill[k] for k in prefill if k in base_prefill]),
        "decode_speedup": geo_mean([decode[k] / base_decode[k] for k in decode if k in base_decode]),
        "ttft_ratio": _ratio(_ttft(record), _ttft(base)),
        "peak_memory_mb": (record.get("speed") or {}).get("peak_memory_mb"),
        "top1_agreement": (record.get("behaviour") or {}).get("mean_top1_agreement"),
        "kl": (record.get("behaviour") or {}).get("mean_kl"),
        "same_answer": ((record.get("behaviour") or {}).get("chat") or {}).get("same_answer"),
    }


def summary_rows(summaries: list[dict]) -> list[dict]:
    """Flat table rows (one per model) with the headline figures."""
    tasks = list(dict.fromkeys(t for s in summaries for t in s["accuracy"]))
    rows = []
    for s in summaries:
        row = {"model": s["label"], "params (M)": _fmt(s["parameters"], 1e-6), "layers": _fmt(s["layers"]),
               "ppl": _fmt(s["perplexity"])}
        row.update({t: _fmt(s["accuracy"].get(t)) for t in tasks})
        row.update({"avg acc": _fmt(s["average_accuracy"]), "retained": _pct(s["retained"]),
                    "prefill x": _fmt(s["prefill_speedup"]), "decode x": _fmt(s["decode_speedup"]),
                    "peak MB": _fmt(s["peak_memory_mb"])})
        if any(x["top1_agreement"] is not None for x in summaries):
            row.update({"top-1 agree": _pct(s["top1_agreement"]), "KL": _fmt(s["kl"]),
                        "same answer": _pct(s["same_answer"])})
        rows.append(row)
    return rows


def _fmt(value, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and scale == 1.0:
        return str(value)
    return f"{value * scale:.4g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- output --------------------------------------------------------------------------------------
def write_report(records: list[dict], out: Path) -> dict:
    """Write report.md, report.json and the charts into `out` (an existing folder); return report.json."""
    if not records:
        raise DepthkitError("nothing to report: no models")
    base = records[0]
    summaries = [summarize(r, base) for r in records]
    report = {"base": base["label"], "summaries": summaries, "records": records}
    write_json(out / "report.json", report)
    charts = [name for name, draw in (("accuracy.png", _accuracy_chart), ("perplexity.png", _perplexity_chart),
                                      ("speed.png", _speed_chart)) if draw(records, out / name)]
    (out / "report.md").write_text(render_markdown(records, summaries, charts))
    return report


def render_markdown(records: list[dict], summaries: list[dict], charts: list[str]) -> str:
    base = records[0]
    lines = [f"# depthkit report: {', '.join(s['label'] for s in summaries)}", "",
             f"Base model: `{base['label']}` ({base.get('model')}). Ratios compare each model with the base: "
             "`retained` = average accuracy / base average accuracy; `prefill x`, `decode x` = tokens/s / base "
             "tokens/s (geometric mean over the measured configurations, > 1 is faster).", "",
             format_table(summary_rows(summaries)), ""]
    chances = [s["chance"] for r in records[:1] for s in (r.get("zeroshot") or {}).get("tasks", {}).values()]
    if chances:
        lines += [f"Chance level of the average accuracy: {sum(chances) / len(chances):.3g}.", ""]
    lines += _task_section(records) + _ppl_section(records) + _behaviour_section(records) + _speed_section(records)
    lines += [f"![{name}]({name})" for name in charts]
    return "\n".join(lines) + "\n"


def _task_section(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        zs = r.get("zeroshot") or {}
        for task, score in zs.get("tasks", {}).items():
            stderr = score["metrics"].get(f"{score['metric']}_stderr")
            rows.append({"model": r["label"], "task": task, "metric": score["metric"],
                         "accuracy": score["accuracy"], "stderr": "-" if stderr is None else stderr,
                         "acc": score["metrics"].get("acc", "-"), "acc_norm": score["metrics"].get("acc_norm", "-"),
                         "chance": score["chance"], "items": score["items"]})
    if not rows:
        return []
    data = next((r["zeroshot"].get("task_data") for r in records if (r.get("zeroshot") or {}).get("task_data")), {})
    note = (f"Offline tasks built from `{data['corpus']}` ({data['split']} split), seed {data['seed']}."
            if data else "")
    return ["## Zero-shot accuracy (lm-evaluation-harness)", "", note, "", format_table(rows), ""]


def _ppl_section(records: list[dict]) -> list[str]:
    rows = [{"model": r["label"], "data": p.get("data", "-"), "window": p["window"], "tokens": p["tokens_scored"],
             "perplexity": p["perplexity"]} for r in records if (p := r.get("perplexity"))]
    return ["## Perplexity", "", format_table(rows), ""] if rows else []


def _behaviour_section(records: list[dict]) -> list[str]:
    rows = [{"model": r["label"], "domain": domain, "perplexity": b["perplexity"],
             "top-1 agreement": b["top1_agreement"], "KL (nats)": b["kl"], "tokens": b["tokens"]}
            for r in records if (behaviour := r.get("behaviour")) for domain, b in behaviour["domains"].items()]
    if not rows:
        return []
    note = ("Against the base model's own next-token predictions on held-out text of every domain: how often the "
            "most likely token is the base's, and KL(base || model); `same answer`: the share of depthkit's chat "
            "prompts where the model would give the base's greedy answer token for token.")
    return ["## Behaviour against the base", "", note, "", format_table(rows), ""]


def _speed_section(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        if not (s := r.get("speed")):
            continue
        rows += [{"model": r["label"], "phase": "prefill", "batch": p["batch_size"], "tokens": p["seq_len"],
                  "tokens/s": p["tokens_per_s"]["median"], "min": p["tokens_per_s"]["min"],
                  "max": p["tokens_per_s"]["max"], "ttft s": "-"} for p in s["prefill"]]
        rows += [{"model": r["label"], "phase": "decode", "batch": d["batch_size"], "tokens": d["new_tokens"],
                  "tokens/s": d["tokens_per_s"]["median"], "min": d["tokens_per_s"]["min"],
                  "max": d["tokens_per_s"]["max"], "ttft s": d["time_to_first_token_s"]["median"]}
                 for d in s["decode"]]
    if not rows:
        return []
    first = next(r["speed"] for r in records if r.get("speed"))
    note = (f"Device {first['device']}, {first['dtype']}, {first['threads']} threads; median of {first['repeats']} "
            f"runs after {first['warmup']} warm-up (min/max = spread).")
    return ["## Speed", "", note, "", format_table(rows), ""]


# -- charts --------------------------------------------------------------------------------------
def _grouped_bars(groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str, path: Path,
                  chance: list[float] | None = None) -> None:
    from depthkit.utils.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
    for g, level in enumerate(chance or []):
        ax.hlines(level, g - 0.45, g + 0.45, colors="black", linestyles="dashed",
                  label="chance" if g == 0 else None)
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _accuracy_chart(records: list[dict], path: Path) -> bool:
    tasks = list(dict.fromkeys(t for r in records for t in _accuracies(r)))
    if not tasks:
        return False
    chance_of = {t: s["chance"] for r in records for t, s in (r.get("zeroshot") or {}).get("tasks", {}).items()}
    series = {r["label"]: [_accuracies(r).get(t) for t in tasks] for r in records}
    _grouped_bars(tasks, series, "accuracy", "Zero-shot accuracy", path, [chance_of[t] for t in tasks])
    return True


def _perplexity_chart(records: list[dict], path: Path) -> bool:
    values = {r["label"]: [r["perplexity"]["perplexity"]] for r in records if r.get("perplexity")}
    if not values:
        return False
    _grouped_bars(["perplexity"], values, "perplexity (lower is better)", "Perplexity", path)
    return True


def _speed_chart(records: list[dict], path: Path) -> bool:
    keys = list(dict.fromkeys(k for r in records for k in _prefill_tps(r)))
    dkeys = list(dict.fromkeys(k for r in records for k in _decode_tps(r)))
    if not keys and not dkeys:
        return False
    groups = [f"prefill b{b}x{n}" for b, n in keys] + [f"decode b{b}" for b in dkeys]
    series = {r["label"]: [_prefill_tps(r).get(k) for k in keys] + [_decode_tps(r).get(k) for k in dkeys]
              for r in records}
    _grouped_bars(groups, series, "tokens/s (higher is better)", "Speed", path)
    return True
