"""Block-pruning baselines on tiny models of every architecture: right blocks, exact math, clean checkpoints."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit
from depthkit.compress import save_compressed
from depthkit.compress.common import capture_states, count_parameters, lm_loss, remove_blocks
from depthkit.compress.methods.attn_drop import attention_importance
from depthkit.compress.methods.laco import merged_parameter_names, rdsc_merge
from depthkit.compress.methods.shortgpt import block_influences
from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids

BLOCK_REMOVERS = ["shortgpt", "sleb", "laco"]


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
    report = depthkit.compress(model, method, ratio=0.34, calib_ids=random_ids(model, batch=4, length=16))
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


def naive_greedy_removal(model, ids, steps: int) -> list[int]:
    """The greedy search done the slow way: full forwards of every candidate (original indices)."""
    model, original, removed = copy.deepcopy(model), list(range(model.config.num_hidden_layers)), []
    for _ in range(steps):
        losses = []
        for index in range(len(original)):
            candidate = copy.deepcopy(model)
            remove_blocks(candidate, [index])
            with torch.no_grad():
                losses.append(float(candidate(ids, labels=ids).loss))
        best = min(range(len(losses)), key=losses.__getitem__)
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


def test_laco_records_merged_groups_in_original_indices():
    model = tiny_model("qwen2", num_layers=8)
    report = depthkit.compress(model, "laco", target_layers=5, calib_ids=random_ids(model, batch=3, length=16),
                               layers_per_merge=2)
    groups = report.details["merged_groups"]
    assert sum(len(g) - 1 for g in groups) == 3
    assert sorted(i for g in groups for i in g[1:]) == report.details["removed_blocks"]
    assert all(g == list(range(g[0], g[0] + len(g))) for g in groups)  # runs of consecutive blocks
    assert report.details["thresholds"][0] == 0.9
    assert len({i for g in groups for i in g}) == sum(len(g) for g in groups)  # a layer merges once


def test_laco_with_one_layer_per_merge_is_block_removal():
    """RDSC of one layer: theta_l + (theta_{l+1} - theta_l) = theta_{l+1}, i.e. block l is dropped."""
    model = tiny_model("llama", num_layers=4)
    layers = get_adapter(model).layers(model)
    merged = rdsc_merge(layers[1], [layers[2]])
    for name, value in merged.named_parameters():
        expected = dict(layers[2].named_parameters())[name] if "norm" not in name else dict(
            layers[1].named_parameters())[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_laco_reaches_the_target_even_when_few_layers_are_left():
    model = tiny_model("llama", num_layers=4)
    report = depthkit.compress(model, "laco", target_layers=2, calib_ids=random_ids(model), layers_per_merge=3,
                               threshold=0.999)
    assert report.num_layers_after == 2 and report.details["removed_blocks"][0] >= 2
    with pytest.raises(DepthkitError, match="above lowest_layer"):
        depthkit.compress(tiny_model("llama", num_layers=4), "laco", target_layers=1, calib_ids=random_ids(model),
                          lowest_layer=1)


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
        depthkit.compress(model, "attn_drop", target_layers=2, calib_ids=random_ids(model))
