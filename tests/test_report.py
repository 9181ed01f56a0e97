"""`depthkit report`: merging evaluation JSONs per model, comparing with the base, writing the report."""

import json

import pytest

from depthkit.cli.main import main
from depthkit.errors import DepthkitError
from depthkit.evaluate.report import merge_results, read_result, summarize


def _eval_jsons(folder, model):
    """ppl, zero-shot and speed results of `model`, written by the eval commands."""
    folder.mkdir()
    common = ["--model", model]
    assert main(["eval", "ppl", *common, "--window", "64", "--max-tokens", "256",
                 "--json", str(folder / "p.json")]) == 0
    assert main(["eval", "zeroshot", *common, "--limit", "4", "--json", str(folder / "z.json")]) == 0
    assert main(["eval", "speed", *common, "--batch-sizes", "1", "--seq-lens", "16", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "2", "--json", str(folder / "s.json")]) == 0
    return ",".join(str(folder / f) for f in ("p.json", "z.json", "s.json"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    return _eval_jsons(root / "base", "tiny:llama"), _eval_jsons(root / "other", "tiny:qwen2")


def test_report_from_json_results(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--base", results[0], "--models", results[1], "--labels", "base,other",
                 "--out", str(out)]) == 0
    assert "retained" in capsys.readouterr().out
    for name in ("report.md", "report.json", "accuracy.png", "perplexity.png", "speed.png",
                 "models/0-base.json", "models/1-other.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    base, other = report["summaries"]
    assert base["prefill_speedup"] == 1.0 and base["decode_speedup"] == 1.0 and base["parameters_ratio"] == 1.0
    assert base["retained"] == (1.0 if base["average_accuracy"] else None)  # a random model may score 0 on 4 items
    assert other["prefill_speedup"] > 0 and other["decode_speedup"] > 0 and other["perplexity"] > 1
    assert set(other["accuracy"]) == {"depthkit_cloze", "depthkit_continuation"}
    markdown = (out / "report.md").read_text()
    assert "| base " in markdown and "| other " in markdown and "![speed.png](speed.png)" in markdown
    assert "## Zero-shot accuracy" in markdown and "## Perplexity" in markdown and "## Speed" in markdown
    # a report's model records are results too: a second report reads them back unchanged
    again = tmp_path / "again"
    assert main(["report", "--base", str(out / "models/0-base.json"), "--models", str(out / "models/1-other.json"),
                 "--out", str(again)]) == 0
    assert json.loads((again / "report.json").read_text())["summaries"] == report["summaries"]


def test_report_evaluates_models_given_by_name(tmp_path):
    out = tmp_path / "direct"
    assert main(["report", "--base", "tiny:llama", "--models", "tiny:mistral", "--evals", "ppl,speed",
                 "--window", "64", "--max-tokens", "128", "--batch-sizes", "1", "--seq-lens", "16",
                 "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["label"] for s in report["summaries"]] == ["tiny:llama", "tiny:mistral"]
    assert report["summaries"][1]["average_accuracy"] is None and not (out / "accuracy.png").exists()


def test_report_bad_input(results, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["report", "--base", results[0], "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["report", "--base", results[0], "--models", results[0], "--out", str(fresh)]) == 2
    assert "same label" in capsys.readouterr().err
    assert main(["report", "--base", results[0], "--evals", "bleu", "--out", str(fresh)]) == 2
    assert main(["report", "--base", "/no/such/model", "--out", str(fresh)]) == 2
    assert not fresh.exists()
    with pytest.raises(DepthkitError, match="two perplexity results"):
        p = read_result(results[0].split(",")[0])
        merge_results([p, p])
    with pytest.raises(DepthkitError, match="not a depthkit evaluation result"):
        merge_results([{"kind": "poem"}])


def _zeroshot(model, cloze, continuation):
    tasks = {t: {"accuracy": a, "metric": "acc", "metrics": {"acc": a}, "items": 10, "chance": 0.25}
             for t, a in (("depthkit_cloze", cloze), ("depthkit_continuation", continuation))}
    return {"kind": "zeroshot", "model": model, "parameters": 100, "tasks": tasks}


def test_retained_fraction_and_ratios():
    base = merge_results([_zeroshot("a", 0.8, 0.4)], "a")
    other = merge_results([_zeroshot("b", 0.6, 0.3)], "b")
    row = summarize(other, base)
    assert row["average_accuracy"] == pytest.approx(0.45) and row["retained"] == pytest.approx(0.75)
    assert row["parameters_ratio"] == 1.0 and row["perplexity"] is None


def test_summary_with_missing_parts():
    base = merge_results([{"kind": "perplexity", "model": "a", "perplexity": 10.0, "tokens_scored": 5}])
    other = merge_results([{"kind": "perplexity", "model": "b", "perplexity": 12.0, "tokens_scored": 5}])
    row = summarize(other, base)
    assert row["perplexity"] == 12.0 and row["retained"] is None and row["prefill_speedup"] is None


def test_report_measures_behaviour_against_the_base(tmp_path, results, capsys):
    out = tmp_path / "behaviour"
    assert main(["report", "--base", "tiny:llama", "--models", "tiny:qwen2", "--evals", "behaviour",
                 "--behaviour-blocks", "2", "--behaviour-len", "32", "--out", str(out)]) == 0
    base, other = json.loads((out / "report.json").read_text())["summaries"]
    assert base["top1_agreement"] == 1.0 and base["kl"] == pytest.approx(0, abs=1e-3) and base["same_answer"] == 1.0
    assert other["top1_agreement"] < 1.0 and other["kl"] > 0.01
    markdown = (out / "report.md").read_text()
    assert "## Behaviour against the base" in markdown and "| pycode " in markdown
    assert main(["report", "--base", results[0], "--models", "tiny:qwen2", "--evals", "behaviour",
                 "--out", str(tmp_path / "no")]) == 2
    assert "give --base as a model" in capsys.readouterr().err
