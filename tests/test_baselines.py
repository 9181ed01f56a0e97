"""Block-pruning baselines on tiny models of every architecture: right blocks, exact math, clean checkpoints."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit
from depthkit.compress import save_compressed
from depthkit.compress.common import capture_states, count_parameters, lm_loss, remove_blocks
from depthkit.compress.methods.attn_drop import attention_importance
from depthkit.compress.methods.laco import drop_merge, merged_parameter_names, rdsc_merge, sequence_cosine
from depthkit.compress.methods.shortgpt import block_influences
from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.skipping import is_zeroed_attention, skip_zeroed_attention
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids

BLOCK_REMOVERS = ["shortgpt", "sleb", "laco"]
# A random tiny model's merges are far from similar: LaCo accepts every one here, to be tested at all.
REMOVER_OPTIONS = {"laco": {"threshold": -1.0, "threshold_floor": -1.0}}


def make_identity(model, index: int) -> None:
    """Zero the output projections of block `index`: the block then passes its input through."""
    parts = get_adapter(model).block(get_adapter(model).layers(model)[index])
    with torch.no_grad():
        parts.attn_out.weight.zero_()
        parts.mlp_out.weight.zero_()


def assert_consistent(model, depth: int) -> None:
    layers = get_adapter(model).layers(model)
    assert len(layers) == model.config.num_hidden_layers == depth
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(depth))
    if getattr(model.config, "layer_types", None):
        assert len(model.config.layer_types) == depth


@pytest.mark.parametrize("method", BLOCK_REMOVERS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_removes_the_requested_blocks_and_reloads_identically(arch, method, tmp_path):
    model = tiny_model(arch, num_layers=6)
    report = depthkit.compress(model, method, ratio=0.34, calib_ids=random_ids(model, batch=4, length=16),
                               **REMOVER_OPTIONS.get(method, {}))
    assert report.num_layers_before == 6 and report.num_layers_after == 4 and report.blocks_requested == 2
    assert len(report.details["removed_blocks"]) == 2
    assert all(0 <= i < 6 for i in report.details["removed_blocks"])
    assert report.parameters_after["total"] < report.parameters_before["total"]
    assert_consistent(model, 4)
    save_compressed(model, None, tmp_path / "out", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(model, batch=2, length=12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_shortgpt_removes_the_lowest_influence_blocks(tiny):
    for index in (1, 3):
        make_identity(tiny, index)
    ids = random_ids(tiny, batch=3, length=16)
    scores = block_influences(tiny, ids)
    assert scores[1] == pytest.approx(0, abs=1e-6) and scores[3] == pytest.approx(0, abs=1e-6)
    assert min(scores[0], scores[2]) > 1e-3
    report = depthkit.compress(tiny, "shortgpt", target_layers=2, calib_ids=ids)
    assert report.details["removed_blocks"] == [1, 3]


def naive_greedy_removal(model, ids, steps: int, allow_ends: bool = False) -> list[int]:
    """The greedy search done the slow way: full forwards of every candidate, the first and last block
    excluded as in the authors' search unless `allow_ends` (original indices)."""
    model, original, removed = copy.deepcopy(model), list(range(model.config.num_hidden_layers)), []
    margin = 0 if allow_ends else 1
    for _ in range(steps):
        losses = {}
        for index in range(margin, len(original) - margin):
            candidate = copy.deepcopy(model)
            remove_blocks(candidate, [index])
            with torch.no_grad():
                losses[index] = float(candidate(ids, labels=ids).loss)
        best = min(losses, key=losses.__getitem__)
        remove_blocks(model, [best])
        removed.append(original.pop(best))
    return removed


def test_sleb_matches_a_naive_greedy_search_and_its_cached_loss_is_exact(tiny):
    ids = random_ids(tiny, batch=3, length=16)
    expected = naive_greedy_removal(tiny, ids, steps=2)
    report = depthkit.compress(tiny, "sleb", target_layers=2, calib_ids=ids)
    assert report.details["removal_order"] == expected
    with torch.no_grad():
        full = float(tiny(ids, labels=ids).loss)
    assert report.details["calibration_loss_after_each_step"][-1] == pytest.approx(full, rel=1e-5)
    assert lm_loss(tiny, capture_states(tiny, ids)[-1], ids) == pytest.approx(full, rel=1e-5)


def test_sleb_never_removes_the_first_or_last_block_unless_allowed():
    model = tiny_model("llama", num_layers=5)
    make_identity(model, 0)
    ids = random_ids(model, batch=3, length=16)
    kept = depthkit.compress(copy.deepcopy(model), "sleb", target_layers=3, calib_ids=ids)
    assert 0 not in kept.details["removed_blocks"] and 4 not in kept.details["removed_blocks"]
    assert any("WikiText-2" in line for line in kept.deviations)
    assert kept.details["removal_order"] == naive_greedy_removal(model, ids, steps=2)
    expected = naive_greedy_removal(model, ids, steps=2, allow_ends=True)
    allowed = depthkit.compress(model, "sleb", target_layers=3, calib_ids=ids, allow_ends=True)
    assert allowed.details["removal_order"] == expected
    assert allowed.details["calibration_loss_after_each_step"][-1] <= kept.details[
        "calibration_loss_after_each_step"][-1] + 1e-6
    with pytest.raises(DepthkitError, match="allow_ends"):
        depthkit.compress(tiny_model("llama", num_layers=4), "sleb", target_layers=1, calib_ids=ids)


def test_sleb_uses_the_selection_subset():
    model = tiny_model("llama", num_layers=4)
    report = depthkit.compress(model, "sleb", target_layers=3, calib_ids=random_ids(model, batch=5, length=8),
                               selection_blocks=2)
    assert report.details["selection_tokens"] == [2, 8]


def test_laco_merge_is_the_sum_of_parameter_differences(tiny):
    layers = get_adapter(tiny).layers(tiny)
    merged = rdsc_merge(layers[1], [layers[2], layers[3]])
    params = [dict(layer.named_parameters()) for layer in (layers[1], layers[2], layers[3])]
    names = merged_parameter_names(merged)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)
    for name, value in merged.named_parameters():
        base, a, b = (p[name] for p in params)
        expected = base + (a - base) + (b - base) if name in names else base
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert merged is not layers[1]  # the candidate never edits the current model


def naive_laco_walk(model, ids, merge: int, threshold: float, interval: int, target: int, kind=rdsc_merge):
    """The authors' notebook loop done the slow way: a deep copy per candidate, full forwards, similarity
    against the ORIGINAL model's last hidden state (each sequence flattened); the merged groups."""
    def last_hidden(m):
        with torch.no_grad():
            return m(ids, output_hidden_states=True).hidden_states[-1]

    reference, current = last_hidden(model), copy.deepcopy(model)
    groups = [[i] for i in range(model.config.num_hidden_layers)]
    layer, removed = model.config.num_hidden_layers - 1 - merge, 0
    while layer >= 0 and removed < target:
        count = min(merge - 1, len(groups) - layer - 1, target - removed)
        candidate = copy.deepcopy(current)
        layers = list(get_adapter(candidate).layers(candidate))
        merged = kind(layers[layer], layers[layer + 1 : layer + 1 + count])
        get_adapter(candidate).set_layers(candidate, [*layers[:layer], merged, *layers[layer + 1 + count :]])
        if sequence_cosine(last_hidden(candidate), reference) > threshold:
            current, removed = candidate, removed + count
            groups[layer : layer + 1 + count] = [[i for g in groups[layer : layer + 1 + count] for i in g]]
            layer -= interval
        else:
            layer -= 1
    return [g for g in groups if len(g) > 1], current


@pytest.mark.parametrize("threshold", [-1.0, 0.6])
@pytest.mark.parametrize("merge", ["rdsc", "drop"])
def test_laco_walk_is_the_authors_algorithm(merge, threshold):
    """Overlapping re-merges (interval < C), reference = the original model, same groups and same logits."""
    model = tiny_model("qwen2", num_layers=10)
    ids = random_ids(model, batch=3, length=16)
    kind = rdsc_merge if merge == "rdsc" else drop_merge
    expected_groups, expected = naive_laco_walk(model, ids, merge=3, threshold=threshold, interval=1, target=5,
                                                kind=kind)
    report = depthkit.compress(model, "laco", target_layers=5, calib_ids=ids, merge_layers=3, interval=1,
                               threshold=threshold, merge=merge)
    assert report.details["merged_groups"] == expected_groups
    if threshold < 0:
        assert any(len(g) > 3 for g in expected_groups)  # a merged layer was merged again
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-4)


def test_laco_drop_merge_keeps_the_base_norms_and_the_last_projections(tiny):
    layers = get_adapter(tiny).layers(tiny)
    merged = drop_merge(layers[1], [layers[2], layers[3]])
    for name, value in merged.named_parameters():
        source = layers[1] if "norm" in name else layers[3]
        torch.testing.assert_close(value, dict(source.named_parameters())[name], rtol=0, atol=0)


def test_laco_merges_less_when_the_threshold_cannot_reach_the_depth(capsys, tmp_path):
    model = tiny_model("llama", num_layers=6)
    ids = random_ids(model, batch=3, length=16)
    report = depthkit.compress(model, "laco", target_layers=2, calib_ids=ids, threshold=0.9999)
    assert report.num_layers_after > 2 and not report.details["target_reached"]
    assert report.details["blocks_removed"] == 6 - report.num_layers_after
    assert report.shortfall() == f"reached {report.num_layers_after} blocks, not 2"
    assert "laco reached" in capsys.readouterr().err
    save_compressed(model, None, tmp_path / "out", report)
    card = (tmp_path / "out" / "compression_card.md").read_text()
    assert "LaCo: Large Language Model Pruning" in card and "Deviations from the paper" in card


def test_laco_bisect_finds_a_threshold_that_reaches_the_depth():
    model = tiny_model("llama", num_layers=6)
    report = depthkit.compress(model, "laco", target_layers=3, calib_ids=random_ids(model, batch=3, length=16),
                               threshold=0.9999, bisect=True, threshold_floor=-1.0)
    assert report.num_layers_after == 3 and report.details["target_reached"]
    tried = report.details["thresholds_tried"]
    assert tried[:2] == [0.9999, -1.0] and -1.0 <= report.details["threshold"] < 0.9999


def test_laco_with_two_layers_per_merge_is_block_removal():
    """RDSC of two layers: theta_l + (theta_{l+1} - theta_l) = theta_{l+1}, i.e. block l is dropped."""
    model = tiny_model("llama", num_layers=4)
    layers = get_adapter(model).layers(model)
    merged = rdsc_merge(layers[1], [layers[2]])
    for name, value in merged.named_parameters():
        expected = dict(layers[2].named_parameters())[name] if "norm" not in name else dict(
            layers[1].named_parameters())[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_attention_drop_zeroes_the_most_identity_like_attention(arch, tmp_path):
    model = tiny_model(arch, num_layers=6)
    for index in (0, 4):
        with torch.no_grad():
            get_adapter(model).block(get_adapter(model).layers(model)[index]).attn_out.weight.zero_()
    ids = random_ids(model, batch=3, length=16)
    scores = attention_importance(model, ids)
    assert scores[0] == pytest.approx(0, abs=1e-6) and scores[4] == pytest.approx(0, abs=1e-6)
    before = count_parameters(model)
    report = depthkit.compress(model, "attn_drop", ratio=0.34, calib_ids=ids, attention_per_block=1)
    assert report.details["dropped_attention"] == [0, 4]
    assert report.num_layers_after == 6 and "not removed" in report.details["warning"]
    parts = get_adapter(model).block(get_adapter(model).layers(model)[4])
    attention = sum(p.numel() for proj in (parts.query, parts.key, parts.value, parts.attn_out)
                    for p in proj.parameters())
    assert report.parameters_after["total"] == before["total"]
    # Block 0 and 4's o_proj were already zero before; now q/k/v (and biases) of both are zero too.
    assert report.parameters_after["effective"] == before["total"] - 2 * attention
    save_compressed(model, None, tmp_path / "out", report)
    assert "WARNING" in (tmp_path / "out" / "compression_card.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_attention_drop_refuses_to_drop_every_attention():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(DepthkitError, match="attention sublayers"):
        depthkit.compress(model, "attn_drop", target_layers=2, calib_ids=random_ids(model), attention_per_block=2)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_skipped_attention_runtime_computes_the_dropped_model_without_its_cache(arch):
    """depthkit's runtime skips zeroed attention: same logits (prefill and cached decoding) and a cache
    without keys or values for the dropped sublayers (a 1 x 1 placeholder per token keeps its length)."""
    model = tiny_model(arch, num_layers=4)
    ids = random_ids(model, batch=2, length=12)
    depthkit.compress(model, "attn_drop", target_layers=2, calib_ids=ids)
    dropped = [i for i, layer in enumerate(get_adapter(model).layers(model)) if is_zeroed_attention(model, layer)]
    assert len(dropped) == 2
    skipping = copy.deepcopy(model)
    assert skip_zeroed_attention(skipping) == dropped and skip_zeroed_attention(skipping) == []
    with torch.no_grad():
        torch.testing.assert_close(skipping(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        generated = skipping.generate(ids, max_new_tokens=5, do_sample=False)
        cache = skipping(ids, use_cache=True).past_key_values
        full_cache = model(ids, use_cache=True).past_key_values
    assert torch.equal(generated, expected)
    for index in range(4):
        keys = cache.layers[index].keys
        assert keys.shape[-2] == full_cache.layers[index].keys.shape[-2]  # sliding layers keep their window
        assert (keys.shape[1] * keys.shape[-1] == 1) == (index in dropped)
