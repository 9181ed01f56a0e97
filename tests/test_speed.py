"""Speed measurement: the expected fields, positive figures, consistent spreads, clear errors."""

import json

import pytest

from depthkit.cli.main import main
from depthkit.errors import DepthkitError
from depthkit.evaluate.speed import Spread, measure_speed
from depthkit.utils.precision import dtype_name, fast_dtype

SMALL = dict(batch_sizes=(1, 2), seq_lens=(8, 16), decode_batch_sizes=(1, 2), prompt_len=8, new_tokens=4,
             repeats=2, warmup=1, progress=False)


def test_spread_and_rates():
    seconds = Spread.of([2.0, 1.0, 4.0])
    assert (seconds.median, seconds.min, seconds.max) == (2.0, 1.0, 4.0)
    rate = seconds.per_second(8)
    assert (rate.median, rate.min, rate.max) == (4.0, 2.0, 8.0)


def test_measure_speed_fields(tiny):
    result = measure_speed(tiny, **SMALL)
    assert [(p["batch_size"], p["seq_len"]) for p in result.prefill] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    assert [d["batch_size"] for d in result.decode] == [1, 2]
    for entry in result.prefill + result.decode:
        tps = entry["tokens_per_s"]
        assert 0 < tps["min"] <= tps["median"] <= tps["max"]
    for entry in result.prefill:
        secs = entry["seconds"]
        assert entry["tokens_per_s"]["median"] == pytest.approx(entry["batch_size"] * entry["seq_len"] / secs["median"])
    for d in result.decode:
        assert d["time_to_first_token_s"]["median"] > 0 and d["new_tokens"] == 4 and d["prompt_len"] == 8
    assert result.peak_memory_mb > 0 and result.memory_kind == "rss"
    assert result.device == "cpu" and result.dtype == "float32" and result.threads >= 1
    assert len(result.rows()) == 6


def test_bad_speed_arguments(tiny):
    with pytest.raises(DepthkitError, match="positive"):
        measure_speed(tiny, **{**SMALL, "repeats": 0})
    with pytest.raises(DepthkitError, match="at least one batch size"):
        measure_speed(tiny, **{**SMALL, "seq_lens": ()})
    with pytest.raises(DepthkitError, match="larger than the model's context"):
        measure_speed(tiny, **{**SMALL, "seq_lens": (100_000,)})


def test_cli_speed_writes_json(tmp_path, capsys):
    path = tmp_path / "speed.json"
    assert main(["eval", "speed", "--model", "tiny:qwen3", "--batch-sizes", "1", "--seq-lens", "16",
                 "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["kind"] == "speed" and data["dtype"] == dtype_name(fast_dtype()) and data["layers"] == 4
    assert data["prefill"][0]["tokens_per_s"]["median"] > 0 and data["decode"][0]["tokens_per_s"]["median"] > 0
    assert "prefill" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse's usage error, before any model is loaded
        main(["eval", "speed", "--model", "tiny:qwen3", "--seq-lens", "a,b"])
    assert "expected comma-separated whole numbers" in capsys.readouterr().err
