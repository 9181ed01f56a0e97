"""Plan, then apply: a method's search returns a `CompressionPlan`, `apply` performs it.

Applying a plan (through its JSON) gives the model `compress` gives; a plan searched for k blocks
serves the counts its method can reuse exactly (a prefix of its steps, any count of a ranking)
with the model a fresh search for that count gives, and refuses the others; the command line
saves a plan and applies it, in memory and streamed, to the same weights.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from depthkit.cli.main import main
from depthkit.compress.api import compress
from depthkit.compress.base import get_method, method_for_plan
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import DepthkitError
from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
from depthkit.models.runner import InMemoryModel, ModelSink
from depthkit.models.tiny import tiny_model
from tests.conftest import random_ids

pytestmark = pytest.mark.usefixtures("one_thread")

# (method, options): every method, with options a random tiny model can honour (LaCo accepts every
# merge at threshold -1; a random model's merges are never similar enough for the paper's 0.65).
METHODS = [
    ("shortgpt", {}),
    ("sleb", {}),
    ("laco", {"threshold": -1.0, "merge_layers": 3, "interval": 1}),
    ("attn_drop", {}),
    ("flatten", {}),
    ("flatten", {"selection": "local", "rescore": False}),
    ("flatten_unpruned", {}),
    ("width", {}),
    ("minitron", {}),
]
METHOD_IDS = ["shortgpt", "sleb", "laco", "attn_drop", "flatten", "flatten-once", "flatten_unpruned", "width",
              "minitron"]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name].shape != b[name].shape or not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def without_timings(details: dict) -> dict:
    return {key: value for key, value in details.items() if not key.startswith("seconds")}


def compressed(arch: str, method: str, target: int, options: dict, plan=None, num_layers: int = 6):
    """A fresh tiny model compressed to `target` blocks (by `plan` if given): its weights and report."""
    model = tiny_model(arch, num_layers=num_layers)
    report = compress(model, method, target_layers=target, calib_ids=random_ids(model, batch=4, length=16),
                      plan=plan, batch_size=2, **options)
    return weights(model), report


@pytest.mark.parametrize(("method", "options"), METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_apply_of_a_saved_plan_is_compress(arch, method, options, tmp_path):
    """search, the plan through its JSON file, apply: the weights and card details of `compress`."""
    expected, report = compressed(arch, method, 4, options)
    model = tiny_model(arch, num_layers=6)
    ids = random_ids(model, batch=4, length=16)
    runner = get_method(method, batch_size=2, **options)
    runner.search(InMemoryModel(model), ids, 2).save(tmp_path / "plan.json")
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.steps == report.plan["steps"] and plan.reuse == report.plan["reuse"]
    assert report.plan_source == "searched"
    with ModelSink(model) as sink:
        outcome = runner.apply(InMemoryModel(model), plan, ids, 2, sink)
    assert_same_weights(weights(model), expected)
    assert without_timings(outcome.details) == without_timings(report.details)


# (method, options, searched for, reused for): the counts each method's plan serves exactly.
PREFIXES = [
    ("shortgpt", {}, 2, 3),  # a ranking serves more blocks than it was searched for, too
    ("shortgpt", {}, 3, 1),
    ("attn_drop", {}, 1, 3),
    ("attn_drop", {"attention_per_block": 2}, 2, 1),
    ("sleb", {}, 3, 1),
    ("sleb", {"allow_ends": True}, 4, 2),
    ("flatten", {}, 3, 1),
    ("flatten", {"selection": "similarity"}, 3, 2),
    ("flatten", {"max_group": 3, "shortlist": 2}, 4, 2),
    ("flatten", {"selection": "local", "rescore": False}, 3, 2),
    ("laco", {"threshold": -1.0, "merge_layers": 3, "interval": 1}, 4, 2),  # merges of 2, 2: the first
]


@pytest.mark.parametrize(("method", "options", "searched", "reused"), PREFIXES)
def test_a_plan_serves_other_counts_as_a_fresh_search_would(method, options, searched, reused):
    _, report = compressed("qwen2", method, 8 - searched, options, num_layers=8)
    plan = CompressionPlan.from_json(json.dumps(report.plan))
    expected, fresh = compressed("qwen2", method, 8 - reused, options, num_layers=8)
    got, applied = compressed("qwen2", method, 8 - reused, options, plan=plan, num_layers=8)
    assert_same_weights(got, expected)
    assert without_timings(applied.details) == without_timings(fresh.details)
    assert applied.plan_source == "given" and applied.plan["num_remove"] == searched


@pytest.mark.parametrize(("method", "options", "searched", "asked", "message"), [
    ("sleb", {}, 2, 3, "was searched for 2 blocks; removing 3 needs a longer search"),
    ("flatten", {}, 1, 2, "was searched for 1 block; removing 2"),
    ("laco", {"threshold": -1.0}, 3, 2, "steps remove 3 blocks in turn; 2 falls inside a step"),
    ("laco", {"threshold": 0.999, "bisect": True, "threshold_floor": -1.0}, 3, 2,
     "serves only the 3 blocks it was searched for (its threshold was bisected"),
    ("width", {}, 2, 1, "serves only the 2 blocks it was searched for (its widths are the parameter budget"),
    ("flatten", {"groups": [[0, 1], [2, 3], [4], [5]]}, 2, 1, "explicit groups fix the count"),
])
def test_a_plan_refuses_counts_it_cannot_serve_exactly(method, options, searched, asked, message):
    _, report = compressed("llama", method, 6 - searched, options)
    model = tiny_model("llama", num_layers=6)
    before = weights(model)
    with pytest.raises(DepthkitError, match=message.replace("(", r"\(")):
        compress(model, target_layers=6 - asked, calib_ids=random_ids(model, 4, 16), plan=report.applied_plan())
    assert_same_weights(weights(model), before)


def test_laco_without_enough_similar_merges_serves_what_it_reached(capsys):
    """A walk that fell short serves the count asked (merging less, as a fresh search would) and
    its prefixes, but not a count between what it reached and what it was asked."""
    _, report = compressed("llama", "laco", 2, {"merge_layers": 3, "threshold": 0.999, "lowest_layer": 3})
    plan = report.applied_plan()
    assert report.details["target_reached"] is False and plan.counts() == []
    _, again = compressed("llama", "laco", 2, {"merge_layers": 3, "threshold": 0.999, "lowest_layer": 3}, plan=plan)
    assert again.details["blocks_removed"] == 0 and "laco reached 6 blocks" in capsys.readouterr().err
    with pytest.raises(DepthkitError, match="search removed only 0 blocks of the 4"):
        plan.check_count(2)


def test_options_that_shaped_the_search_must_agree_and_pruning_options_may_differ():
    _, report = compressed("llama", "flatten", 4, {"selection": "local"})
    plan = report.applied_plan()
    with pytest.raises(DepthkitError, match=r"option\(s\) selection='greedy' differ from the plan's"):
        method_for_plan(plan, None, {"selection": "greedy"})
    with pytest.raises(DepthkitError, match="the plan was searched by flatten, not sleb"):
        method_for_plan(plan, "sleb", {})
    assert method_for_plan(plan, "flatten_unpruned", {}).name == "flatten_unpruned"  # one search, two applies
    runner = method_for_plan(plan, None, {"ridge": 0.05, "criterion": "nystrom"})
    assert runner.settings.selection == "local" and runner.settings.ridge == 0.05
    refit, other = compressed("llama", "flatten", 4, {"ridge": 0.05, "criterion": "nystrom"}, plan=plan)
    assert other.details["flattened_groups"] == report.details["flattened_groups"]
    assert other.options == {"selection": "local", "batch_size": 2, "ridge": 0.05, "criterion": "nystrom"}
    default, _ = compressed("llama", "flatten", 4, {}, plan=plan)
    assert any(not torch.equal(refit[name], default[name]) for name in refit)


def test_plan_json_round_trip_and_validation(tmp_path):
    _, report = compressed("llama", "sleb", 4, {})
    plan = report.applied_plan()
    path = plan.save(tmp_path / "plans" / "sleb.json")
    assert CompressionPlan.load(path) == plan and not list((tmp_path / "plans").glob(".*"))
    json.loads(path.read_text())  # strict JSON
    card = tmp_path / "card.json"
    card.write_text(json.dumps(report.to_dict()))
    assert CompressionPlan.load(card) == plan  # a compression card is read as its plan
    data = plan.to_dict()
    bad = [
        ({**data, "reuse": "sometimes"}, "reuse must be one of ranking, prefix, exact"),
        ({**data, "num_remove": 6}, "1 <= num_remove < num_layers"),
        ({**data, "format": 2}, "plan format 2"),
        ({**data, "extra": 1}, "unknown field"),
        ({key: value for key, value in data.items() if key != "steps"}, "not a compression plan: no steps"),
        ({**data, "steps": [{"block": 1}]}, "every step of a prefix plan says how many blocks it removes"),
        ({**data, "steps": [{"block": "one", "removes": 1}]}, "`block` must be a block index"),
        ({**data, "reuse": "ranking"}, "a ranking plan ranks every block"),
        ([1, 2], "is not a compression plan"),
    ]
    for value, message in bad:
        with pytest.raises(DepthkitError, match=message):
            CompressionPlan.from_dict(value)
    with pytest.raises(DepthkitError, match="is not JSON"):
        CompressionPlan.from_json("{")
    with pytest.raises(DepthkitError, match=r"is not strict JSON \(NaN is no JSON number\)"):
        CompressionPlan.from_json(plan.to_json().replace('"score": ', '"score": NaN, "x": ', 1))
    with pytest.raises(DepthkitError, match="does not exist"):
        CompressionPlan.load(tmp_path / "nope.json")


def test_a_plan_of_another_depth_or_an_unknown_method_is_refused_before_any_change():
    _, report = compressed("llama", "shortgpt", 4, {})
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(DepthkitError, match="searched on a 6-block model"):
        compress(model, target_layers=3, calib_ids=random_ids(model, 4, 16), plan=report.applied_plan())
    unknown = CompressionPlan.from_dict({**report.plan, "method": "bogus"})
    with pytest.raises(DepthkitError, match="unknown method 'bogus'"):
        compress(model, target_layers=3, calib_ids=random_ids(model, 4, 16), plan=unknown)
    assert model.config.num_hidden_layers == 4


def test_a_damaged_plan_is_one_clear_error():
    _, report = compressed("llama", "flatten", 4, {})
    plan = report.applied_plan()
    plan.steps[0]["blocks"] = [0, 5]
    with pytest.raises(DepthkitError, match=r"flattens blocks \[0, 5\], which are not adjacent"):
        compressed("llama", "flatten", 4, {}, plan=plan)
    _, report = compressed("llama", "laco", 4, {"threshold": -1.0})
    plan = report.applied_plan()
    del plan.steps[0]["position"]
    with pytest.raises(DepthkitError, match="give position, removes, blocks, score; this plan's lack position"):
        compressed("llama", "laco", 4, {"threshold": -1.0}, plan=plan)
    _, report = compressed("llama", "width", 4, {})
    plan = report.applied_plan()
    plan.details["kept_widths"]["neurons"] = 0
    with pytest.raises(DepthkitError, match="kept_widths must give"):
        compressed("llama", "width", 4, {}, plan=plan)


# -- the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model("qwen2", num_layers=6, vocab_size=len(tokenizer)).save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    return folder


def checkpoint(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def cli(*argv: str) -> None:
    assert main(["compress", *argv, "--num-calib-blocks", "2", "--calib-block-len", "32", "--dtype",
                 "float32"]) in (None, 0)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_cli_save_plan_then_plan_gives_the_same_weights(saved_model, tmp_path, offload, capsys):
    model = ["--model", str(saved_model), "--offload", offload]
    plan = tmp_path / "plan.json"
    cli(*model, "--method", "flatten", "--target-layers", "4", "--save-plan", str(plan), "--out", str(tmp_path / "a"))
    assert f"wrote plan {plan}" in capsys.readouterr().out
    cli(*model, "--plan", str(plan), "--target-layers", "4", "--out", str(tmp_path / "b"))
    assert_same_weights(checkpoint(tmp_path / "b"), checkpoint(tmp_path / "a"))
    card = json.loads((tmp_path / "b" / "compression_card.json").read_text())
    assert card["plan_source"] == f"file {plan}" and card["plan"] == json.loads(plan.read_text())
    assert card["method"] == "flatten" and "plan" in (tmp_path / "b" / "compression_card.md").read_text()
    # a prefix: 5 blocks from the plan searched for 2 removals is a fresh search for 1
    cli(*model, "--plan", str(plan), "--target-layers", "5", "--out", str(tmp_path / "c"))
    cli(*model, "--method", "flatten", "--target-layers", "5", "--out", str(tmp_path / "d"))
    assert_same_weights(checkpoint(tmp_path / "c"), checkpoint(tmp_path / "d"))


def test_cli_saves_a_plan_without_out(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    cli("--model", "tiny:llama", "--method", "shortgpt", "--ratio", "0.5", "--save-plan", str(plan))
    saved = CompressionPlan.load(plan)
    assert saved.method == "shortgpt" and saved.reuse == "ranking" and len(saved.steps) == 4
    assert list(tmp_path.iterdir()) == [plan]
