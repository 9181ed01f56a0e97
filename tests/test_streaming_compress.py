"""`--offload disk`: compressing a checkpoint block by block gives the same model as in memory."""

import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthkit.cli.main import main
from depthkit.compress.api import CARD_JSON, compress, compress_checkpoint
from depthkit.compress.base import streaming_methods
from depthkit.compress.flatten.selection import one_pass_pairs, select_groups
from depthkit.errors import DepthkitError
from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
from depthkit.models.streaming import StreamingModel
from depthkit.models.tiny import PRE_NORM_ARCHITECTURES, TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_tiny(tmp_path, arch: str, num_layers: int = 6, tokenizer=None):
    vocab = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
    model = tiny_model(arch, num_layers=num_layers, dtype=torch.float32, **vocab)
    folder = tmp_path / f"{arch}-src"
    model.save_pretrained(folder, max_shard_size="200KB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model, folder


def reloaded_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_shortgpt_equals_in_memory(tmp_path, arch):
    model, folder = saved_tiny(tmp_path, arch)
    ids = random_ids(model, batch=4, length=16)
    streamed = compress_checkpoint(folder, tmp_path / "out", "shortgpt", target_layers=4, calib_ids=ids,
                                   dtype="float32", batch_size=2)
    in_memory = compress(model, "shortgpt", target_layers=4, calib_ids=ids, batch_size=2)
    assert streamed.details["removed_blocks"] == in_memory.details["removed_blocks"]
    assert streamed.num_layers_after == 4 and streamed.parameters_after["total"] < streamed.parameters_before["total"]
    torch.testing.assert_close(reloaded_logits(tmp_path / "out", ids), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_attn_drop_equals_in_memory(tmp_path, arch):
    model, folder = saved_tiny(tmp_path, arch)
    ids = random_ids(model, batch=4, length=16)
    streamed = compress_checkpoint(folder, tmp_path / "out", "attn_drop", target_layers=4, calib_ids=ids,
                                   dtype="float32", batch_size=2, attention_per_block=1)
    in_memory = compress(model, "attn_drop", target_layers=4, calib_ids=ids, batch_size=2, attention_per_block=1)
    assert streamed.details["dropped_attention"] == in_memory.details["dropped_attention"]
    assert streamed.details["attention_importance"] == tolerant(in_memory.details["attention_importance"])
    assert streamed.num_layers_after == 6 and "not removed" in streamed.details["warning"]
    assert streamed.parameters_after == in_memory.parameters_after  # zeroed sublayers are not effective
    assert streamed.parameters_after["effective"] < streamed.parameters_after["total"]
    torch.testing.assert_close(reloaded_logits(tmp_path / "out", ids), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
def test_streamed_flatten_equals_in_memory_for_the_same_pairs(tmp_path, arch):
    model, folder = saved_tiny(tmp_path, arch)
    ids = random_ids(model, batch=4, length=16)
    options = {"groups": [[0], [1, 2], [3], [4, 5]], "batch_size": 2, "qk_norm": "average"}  # qwen3: random norms
    report = compress_checkpoint(folder, tmp_path / "out", "flatten", target_layers=4, calib_ids=ids,
                                 dtype="float32", **options)
    compress(model, "flatten", target_layers=4, calib_ids=ids, **options)
    assert report.details["flattened_groups"] == [[1, 2], [4, 5]]
    torch.testing.assert_close(reloaded_logits(tmp_path / "out", ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    card = json.loads((tmp_path / "out" / CARD_JSON).read_text())
    assert card["details"]["offload"] == "disk" and card["details"]["peak_memory_mb"]["ru_maxrss_mb"] > 0
    assert card["parameters_after"]["total"] == sum(p.numel() for p in model.parameters())


# (method, target depth of 6 blocks, options): the LaCo cases accept every merge (a random tiny model's
# merges are not similar); the last one, with interval < C, merges a merged layer again.
SEARCHES = [("sleb", 3, {}), ("laco", 3, {"threshold": -1.0}),
            ("laco", 2, {"threshold": -1.0, "merge_layers": 3, "interval": 1})]
SEARCH_IDS = ["sleb", "laco", "laco-remerge"]


def streamed_and_in_memory(tmp_path, arch: str, method: str, target: int, options: dict):
    model, folder = saved_tiny(tmp_path, arch)
    ids = random_ids(model, batch=4, length=16)
    streamed = compress_checkpoint(folder, tmp_path / "out", method, target_layers=target, calib_ids=ids,
                                   dtype="float32", batch_size=2, **options)
    in_memory = compress(model, method, target_layers=target, calib_ids=ids, batch_size=2, **options)
    return model, ids, streamed, in_memory


@pytest.mark.parametrize(("method", "target", "options"), SEARCHES, ids=SEARCH_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_search_equals_in_memory(tmp_path, arch, method, target, options):
    model, ids, streamed, in_memory = streamed_and_in_memory(tmp_path, arch, method, target, options)
    assert {key: streamed.details[key] for key in in_memory.details} == tolerant(in_memory.details)
    assert streamed.num_layers_after == in_memory.num_layers_after == target
    if options.get("interval") == 1:  # a merged layer was merged again: nested recipes rebuilt from the files
        assert len(streamed.details["merges"]) > len(streamed.details["merged_groups"])
    torch.testing.assert_close(reloaded_logits(tmp_path / "out", ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def tolerant(value):
    """`value` with every float compared to float tolerance (`pytest.approx` does not nest)."""
    if isinstance(value, float):
        return pytest.approx(value, abs=1e-5)
    if isinstance(value, dict):
        return {key: tolerant(item) for key, item in value.items()}
    return [tolerant(item) for item in value] if isinstance(value, list) else value


def track_live_layers(monkeypatch) -> list[int]:
    """Count the original blocks a streamed run holds at once: `[most]`, updated as blocks are loaded."""
    live, most = weakref.WeakSet(), [0]
    original = StreamingModel.load_layer

    def tracked(self, index):
        layer = original(self, index)
        live.add(layer)
        most[0] = max(most[0], len(live))
        return layer

    monkeypatch.setattr(StreamingModel, "load_layer", tracked)
    return most


@pytest.mark.parametrize(("method", "target", "options"), SEARCHES, ids=SEARCH_IDS)
def test_streamed_searches_hold_one_block_or_one_merge(tmp_path, monkeypatch, method, target, options):
    """Original blocks alive at once: one for SLEB; for LaCo the C (merge_layers, default 4) one merge combines."""
    most = track_live_layers(monkeypatch)
    model, folder = saved_tiny(tmp_path, "llama")
    compress_checkpoint(folder, tmp_path / "out", method, target_layers=target, calib_ids=random_ids(model, 4, 16),
                        dtype="float32", batch_size=2, **options)
    assert most[0] == (1 if method == "sleb" else options.get("merge_layers", 4))


@pytest.mark.parametrize("selection", ["local", "similarity"])
def test_one_pass_pairs_are_disjoint_and_scored_on_the_original(tmp_path, selection):
    model, folder = saved_tiny(tmp_path, "llama", num_layers=8)
    ids = random_ids(model, batch=2, length=16)
    source = StreamingModel.open(folder, dtype="float32")
    groups, log = one_pass_pairs(source, ids, 3, selection, batch_size=2, progress=False)
    assert sum(groups, []) == list(range(8)) and len(groups) == 5
    assert sorted(g for g in groups if len(g) == 2) == sorted(entry["flattened"] for entry in log)
    in_memory, _ = one_pass_pairs(model, ids, 3, selection, 2, progress=False)
    assert in_memory == groups


FLATTEN_SELECTIONS = [{}, {"selection": "local"}, {"selection": "similarity"}, {"max_group": 3, "shortlist": 2},
                      {"selection": "local", "rescore": False}, {"selection": "similarity", "rescore": False}]


@pytest.mark.parametrize("options", FLATTEN_SELECTIONS, ids=["greedy", "local", "similarity", "greedy-triples",
                                                             "local-once", "similarity-once"])
def test_streamed_flatten_equals_in_memory(tmp_path, options):
    """Same command, same model: every pair selection picks the same groups and weights streamed."""
    model, folder = saved_tiny(tmp_path, "qwen2", num_layers=8)
    ids = random_ids(model, batch=4, length=16)
    options = options | {"batch_size": 2}
    streamed = compress_checkpoint(folder, tmp_path / "out", "flatten", target_layers=5, calib_ids=ids,
                                   dtype="float32", **options)
    in_memory = compress(model, "flatten", target_layers=5, calib_ids=ids, **options)
    assert streamed.details["flattened_groups"] == in_memory.details["flattened_groups"]
    assert streamed.details["selection_log"] == tolerant(in_memory.details["selection_log"])
    assert streamed.details["options"] == in_memory.details["options"]
    assert streamed.num_layers_after == 5
    torch.testing.assert_close(reloaded_logits(tmp_path / "out", ids), model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["width", "minitron"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_width_pruning_equals_in_memory(tmp_path, arch, method):
    """Width pruning streamed: the same weights block by block, and a config for the new widths."""
    model, ids, streamed, in_memory = streamed_and_in_memory(tmp_path, arch, method, 4, {})
    assert streamed.details["widths"] == in_memory.details["widths"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert reloaded.config.intermediate_size == model.config.intermediate_size
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_streamed_greedy_selection_holds_one_group(tmp_path, monkeypatch):
    """Re-scored selection streamed: original blocks alive at once stay within one candidate pair."""
    most = track_live_layers(monkeypatch)
    model, folder = saved_tiny(tmp_path, "llama", num_layers=8)
    source = StreamingModel.open(folder, dtype="float32")
    select_groups(source, random_ids(model, 4, 16), 3, "greedy", batch_size=2, progress=False)
    assert most[0] <= 2


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    model, folder = saved_tiny(tmp_path, "llama")
    ids = random_ids(model, batch=2, length=16)
    assert streaming_methods() == ["attn_drop", "flatten", "laco", "minitron", "shortgpt", "sleb", "width"]
    with pytest.raises(DepthkitError, match="needs the whole model in memory"):
        compress_checkpoint(folder, tmp_path / "a", "flatten_unpruned", target_layers=4, calib_ids=ids)
    with pytest.raises(DepthkitError, match="rescore=false scores disjoint pairs once"):
        compress_checkpoint(folder, tmp_path / "b", "flatten", target_layers=4, calib_ids=ids, rescore=False)
    with pytest.raises(DepthkitError, match="ratio must be in"):
        compress_checkpoint(folder, tmp_path / "c", "shortgpt", ratio=1.5, calib_ids=ids)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_interrupted_streaming_leaves_no_output(tmp_path, monkeypatch):
    model, folder = saved_tiny(tmp_path, "llama")
    ids = random_ids(model, batch=2, length=16)

    def fail(self, index):
        if index == 3:
            raise RuntimeError("disk vanished")
        return original(self, index)

    original = StreamingModel.load_layer
    monkeypatch.setattr(StreamingModel, "load_layer", fail)
    with pytest.raises(RuntimeError, match="disk vanished"):
        compress_checkpoint(folder, tmp_path / "out", "shortgpt", target_layers=4, calib_ids=ids)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_cli_offload_disk(tmp_path, capsys):
    _, folder = saved_tiny(tmp_path, "llama", tokenizer=load_tokenizer(DEFAULT_MODEL))
    out = tmp_path / "out"
    code = main(["compress", "--model", str(folder), "--method", "shortgpt", "--target-layers", "4",
                 "--offload", "disk", "--out", str(out), "--num-calib-blocks", "2", "--calib-block-len", "32",
                 "--dtype", "float32"])
    assert code in (None, 0)
    printed = capsys.readouterr().out
    assert "peak RSS (MiB)" in printed and "6 -> 4" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert main(["compress", "--model", str(folder), "--method", "shortgpt", "--target-layers", "4",
                 "--offload", "disk"]) == 2
    assert "give --out" in capsys.readouterr().err
