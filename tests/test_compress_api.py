"""`depthkit.compress` / `save_compressed` / `depthkit compress`: validation, cards, atomic output."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit
from depthkit.cli.compress import parse_options
from depthkit.cli.main import main
from depthkit.compress import CompressionReport, save_compressed
from depthkit.errors import DepthkitError
from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
from depthkit.models.tiny import tiny_model
from tests.conftest import random_ids


@pytest.fixture
def model():
    return tiny_model("llama", num_layers=4)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0), "ratio must be in (0, 1)"),
        (dict(ratio=1), "ratio must be in (0, 1)"),
        (dict(ratio=1.5), "ratio must be in (0, 1)"),
        (dict(ratio=0.1), "removes no block"),
        (dict(target_layers=0), "`target_layers` must be in 1..3"),
        (dict(target_layers=4), "`target_layers` must be in 1..3"),
        (dict(target_layers=9), "`target_layers` must be in 1..3"),
        (dict(ratio=0.5, target_layers=2), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(ratio=0.5, method="nope"), "unknown method 'nope'"),
        (dict(ratio=0.5, method="sleb", selction_blocks=2), "has no option selction_blocks"),
        (dict(ratio=0.5, method="sleb", selection_blocks=2.5), "must be a whole number"),
        (dict(ratio=0.5, method="sleb", selection_blocks=0), "selection_blocks must be >= 1"),
        (dict(ratio=0.5, method="laco", threshold="lots"), "laco option threshold: cannot read"),
        (dict(ratio=0.5, method="laco", merge_layers=1), "merge_layers >= 2"),
        (dict(ratio=0.5, method="laco", merge="sum"), "merge must be one of rdsc, drop"),
        (dict(ratio=0.5, method="laco", bisect=True, threshold_floor=0.9), "threshold_floor <= threshold"),
        (dict(ratio=0.5, method="laco", threshold=float("nan")), "threshold must be a finite number"),
        (dict(ratio=0.5, batch_size=0), "batch_size must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_change(model, kwargs, message):
    kwargs.setdefault("method", "shortgpt")
    with pytest.raises(DepthkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        depthkit.compress(model, calib_ids=random_ids(model), **kwargs)
    assert model.config.num_hidden_layers == 4


def test_bad_calibration_input(model, tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words.")
    with pytest.raises(DepthkitError, match="text too short"):
        depthkit.compress(model, "shortgpt", ratio=0.5, tokenizer=tokenizer, calib=str(short),
                          num_calib_blocks=4, calib_block_len=64)
    with pytest.raises(DepthkitError, match="give calib_ids, or a tokenizer"):
        depthkit.compress(model, "shortgpt", ratio=0.5)
    with pytest.raises(DepthkitError, match="2-D tensor of token ids"):
        depthkit.compress(model, "shortgpt", ratio=0.5, calib_ids=torch.zeros(4, 8))
    with pytest.raises(DepthkitError, match="must be in 0..255"):
        depthkit.compress(model, "shortgpt", ratio=0.5, calib_ids=torch.full((2, 8), 999))


def test_report_and_card_from_real_text(model, tokenizer, tmp_path):
    model = tiny_model("llama", num_layers=4, vocab_size=len(tokenizer))
    report = depthkit.compress(model, "shortgpt", target_layers=3, tokenizer=tokenizer, calib="austen:emma",
                               num_calib_blocks=2, calib_block_len=32)
    assert isinstance(report, CompressionReport)
    assert report.calibration["data"] == "austen:emma [calib]" and report.calibration["corpora"] == ["austen:emma"]
    assert (report.calibration["sequences"], report.calibration["tokens_per_sequence"]) == (2, 32)
    assert report.parameters_before["total"] - report.parameters_after["total"] == sum(
        p.numel() for p in tiny_model("llama", num_layers=1).model.layers[0].parameters())
    out = save_compressed(model, tokenizer, tmp_path / "ckpt", report)
    card = json.loads((out / "compression_card.json").read_text())
    assert card["method"] == "shortgpt" and card["num_layers_after"] == 3
    assert card["details"]["removed_blocks"] == report.details["removed_blocks"]
    assert card["depthkit_version"] == depthkit.__version__
    markdown = (out / "compression_card.md").read_text()
    assert "4 -> 3 blocks" in markdown and "austen:emma [calib], 2 x 32 tokens" in markdown
    assert (out / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_existing_folder_is_refused_and_left_untouched(model, tmp_path):
    report = depthkit.compress(model, "shortgpt", ratio=0.5, calib_ids=random_ids(model))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DepthkitError, match="already exists"):
        save_compressed(model, None, tmp_path / "out", report)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    # --overwrite never deletes the user's own files
    with pytest.raises(DepthkitError, match="was not written by depthkit"):
        save_compressed(model, None, tmp_path / "out", report, overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "out" / "keep.txt").unlink()
    save_compressed(model, None, tmp_path / "out", report, overwrite=True)  # an empty folder may be replaced
    save_compressed(model, None, tmp_path / "out", report, overwrite=True)  # and depthkit's own output
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / ".depthkit-output").exists()


def test_no_half_written_folder_after_a_failure(model, tmp_path):
    report = depthkit.compress(model, "shortgpt", ratio=0.5, calib_ids=random_ids(model))
    report.details["unserialisable"] = object()  # the card fails to write after the weights were saved
    with pytest.raises(TypeError):
        save_compressed(model, None, tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []


def test_unsaveable_results_are_refused(model, tmp_path):
    report = depthkit.compress(model, "shortgpt", ratio=0.5, calib_ids=random_ids(model))
    report.saveable = False
    with pytest.raises(DepthkitError, match="does not produce a standard checkpoint"):
        save_compressed(model, None, tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []


def test_callable_package_and_lazy_top_level_api(model):
    import depthkit.compress as package

    assert depthkit.compress is package and callable(package)
    assert depthkit.save_compressed is save_compressed
    assert package(model, "shortgpt", ratio=0.5, calib_ids=random_ids(model)).num_layers_after == 2


def test_option_values_are_typed():
    assert parse_options(["a=3", "b=0.5", "c=true", "d=False", "e=text", "selection-blocks=4"]) == {
        "a": 3, "b": 0.5, "c": True, "d": False, "e": "text", "selection_blocks": 4}
    with pytest.raises(DepthkitError, match="KEY=VALUE"):
        parse_options(["novalue"])


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


TINY = ["compress", "--model", "tiny:llama", "--num-calib-blocks", "2", "--calib-block-len", "16"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope", "--ratio", "0.5"], "unknown method 'nope'"),
        (["--method", "shortgpt", "--target-layers", "9"], "--target-layers must be in 1..3"),
        (["--method", "shortgpt"], "exactly one of"),
        (["--method", "sleb", "--ratio", "0.5", "--option", "oops"], "KEY=VALUE"),
        (["--method", "sleb", "--ratio", "0.5", "--option", "nope=1"], "has no option nope"),
        (["--method", "shortgpt", "--ratio", "0.5", "--num-calib-blocks", "100000"], "text too short"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, extra, message):
    code, _out, err = run_cli(capsys, *TINY, *extra)
    assert code == 2 and err.startswith("depthkit: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_cli_existing_out_refused_before_work(capsys, tmp_path):
    code, _out, err = run_cli(capsys, *TINY, "--method", "shortgpt", "--ratio", "0.5", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err


def test_cli_unsaveable_method_is_refused_before_work(capsys, tmp_path):
    code, _out, err = run_cli(capsys, *TINY, "--method", "flatten_unpruned", "--ratio", "0.5",
                              "--out", str(tmp_path / "wide"))
    assert code == 2 and err.startswith("depthkit: error: ") and len(err.splitlines()) == 1
    assert "does not produce a standard checkpoint" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_compresses_saves_and_lists(capsys, tmp_path):
    out = tmp_path / "short"
    code, stdout, _err = run_cli(capsys, *TINY, "--method", "sleb", "--ratio", "0.5", "--option",
                                 "selection_blocks=1", "--out", str(out), "--json", str(tmp_path / "r.json"))
    assert code == 0 and "4 -> 2" in stdout
    card = json.loads((out / "compression_card.json").read_text())
    assert card["options"] == {"selection_blocks": 1} and card["model"] == "tiny:llama"
    assert json.loads((tmp_path / "r.json").read_text())["details"] == card["details"]
    code, stdout, _err = run_cli(capsys, "compress", "--list")
    assert code == 0
    for method in ("shortgpt", "sleb", "laco", "attn_drop", "flatten", "flatten_unpruned"):
        assert f"| {method} " in stdout
    for name in ("merge_layers", "attention_per_block", "selection_blocks", "qk_norm", "batch_size"):
        assert name in stdout


@pytest.mark.integration
def test_cli_on_smollm2_saves_a_checkpoint_that_plain_transformers_runs(capsys, tmp_path, smollm2):
    out = tmp_path / "smol28"
    code, stdout, err = run_cli(capsys, "compress", "--method", "shortgpt", "--ratio", "0.07",
                                "--num-calib-blocks", "2", "--calib-block-len", "64", "--out", str(out),
                                "--eval-data", "austen:persuasion", "--eval-window", "128", "--eval-max-tokens", "256")
    assert code == 0, err
    assert "30 -> 28" in stdout
    card = json.loads((out / "compression_card.json").read_text())
    assert len(card["details"]["removed_blocks"]) == 2
    ppl = card["details"]["held_out_perplexity"]
    assert 1 < ppl["before"] < ppl["after"] < 1e4  # finite, and removal costs something
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 28
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(generated).logits
    assert generated.shape[1] == ids.shape[1] + 4 and torch.isfinite(logits).all()


def test_a_second_method_with_a_registered_name_is_an_error():
    from depthkit.compress.base import CompressionMethod, register_method

    with pytest.raises(DepthkitError, match="two compression methods are registered as 'sleb'"):
        register_method("sleb")(type("Impostor", (CompressionMethod,), {}))
