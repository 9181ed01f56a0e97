"""FlattenGPT on tiny random models of every architecture: exact flattening, selection, pruning."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit
from depthkit.compress.base import get_method
from depthkit.compress.common import lm_loss
from depthkit.compress.flatten import FlattenOptions, flatten_gpt, flatten_layers, select_groups
from depthkit.compress.flatten.channels import (
    GramAccumulator,
    _column_pivots,
    _unit_pivots,
    residual_energy,
    ridge_solve,
    select_units,
)
from depthkit.compress.flatten.prune import GroupPruner
from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import block_context, embed, run_block
from depthkit.models.runner import BlockRunner, iterate_blocks
from depthkit.models.tiny import PRE_NORM_ARCHITECTURES, TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids


def _share_qk_norms(model) -> None:
    """Give every Qwen3 block the same q/k norm weights (the case where flattening is exact)."""
    layers = get_adapter(model).layers(model)
    for layer in layers[1:]:
        if hasattr(layer.self_attn, "q_norm"):
            layer.self_attn.q_norm.weight.data.copy_(layers[0].self_attn.q_norm.weight)
            layer.self_attn.k_norm.weight.data.copy_(layers[0].self_attn.k_norm.weight)


def _parallel(model, layers, x):
    """The spec's formula: every block's attention and MLP read the same input (per half)."""
    kwargs = block_context(model, x).layer_kwargs(layers[0])
    y = x + sum(layer.self_attn(layer.input_layernorm(x), **kwargs)[0] for layer in layers)
    return y + sum(layer.mlp(layer.post_attention_layernorm(y)) for layer in layers)


@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
@pytest.mark.parametrize("count", [2, 3])
def test_flattened_block_equals_parallel_formula(arch, count):
    extra = {"attention_bias": True, "mlp_bias": True} if arch == "llama" else {}
    model = tiny_model(arch, num_layers=4, **extra)
    _share_qk_norms(model)
    layers = list(get_adapter(model).layers(model))[1 : 1 + count]
    x = torch.randn(2, 10, model.config.hidden_size)
    merged = flatten_layers(model, layers)
    parts = get_adapter(model).block(merged)
    assert parts.query.weight.shape[0] == count * model.config.num_attention_heads * 16
    assert parts.mlp_out.weight.shape[1] == count * model.config.intermediate_size
    out = merged(x, **block_context(model, x).layer_kwargs(merged))
    torch.testing.assert_close(out, _parallel(model, layers, x), atol=1e-5, rtol=1e-5)


def test_qwen3_different_qk_norms_refused_or_averaged():
    model = tiny_model("qwen3")
    layers = list(get_adapter(model).layers(model))[:2]
    with pytest.raises(DepthkitError, match="qk_norm='average'"):
        flatten_layers(model, layers, qk_norm="exact")
    merged = flatten_layers(model, layers, qk_norm="average")
    expected = (layers[0].self_attn.q_norm.weight + layers[1].self_attn.q_norm.weight) / 2
    torch.testing.assert_close(merged.self_attn.q_norm.weight, expected)


def test_ridge_and_ols_selection_on_a_planted_problem():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 12, generator=generator, dtype=torch.float64)
    true = torch.zeros(3, 12, dtype=torch.float64)
    true[:, [2, 5, 7]] = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    target = z @ true.T
    gram = GramAccumulator()
    gram.add(z, target)
    solved = ridge_solve(gram.C, gram.R, torch.tensor([2, 5, 7]), 0.0)
    torch.testing.assert_close(solved, true[:, [2, 5, 7]], atol=1e-5, rtol=1e-5)
    weight = torch.ones(3, 12)  # a misleading unpruned weight: magnitude cannot see the target
    units = list(torch.arange(12).unsqueeze(1))
    assert select_units(gram.C, gram.R, weight, units, 3, "ols", 1e-9) == [2, 5, 7]
    assert residual_energy(gram.C, gram.R, torch.tensor([2, 5, 7]), 0.0, gram.target_energy) < 1e-5 * gram.target_energy
    # The lazy column path and the explicit block path make the same greedy choices.
    column_order = _column_pivots(gram.C, 5, gram.R, 1e-3).tolist()
    unit_order = _unit_pivots(gram.C, units, 5, gram.R, 1e-3)
    assert column_order == unit_order


def test_ridge_towards_the_weights_interpolates_between_refit_and_no_refit():
    """ridge_prior=weights: lam -> 0 gives the least-squares refit, lam -> inf the kept columns'
    own weights, and in between the exact minimiser of ||T - Z B||^2 + lam ||B - B_0||^2."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    target = z @ torch.randn(6, 4, generator=generator, dtype=torch.float64)
    prior = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    gram = GramAccumulator()
    gram.add(z, target)
    keep = torch.arange(6)
    torch.testing.assert_close(ridge_solve(gram.C, gram.R, keep, 1e-12, prior), ridge_solve(gram.C, gram.R, keep, 0.0))
    torch.testing.assert_close(ridge_solve(gram.C, gram.R, keep, 1e12, prior), prior)
    lam = 50.0
    direct = torch.linalg.solve(z.T @ z + lam * torch.eye(6, dtype=torch.float64), z.T @ target + lam * prior.T).T
    # The Gram statistics are accumulated from float32 products: float32 tolerances.
    torch.testing.assert_close(ridge_solve(gram.C, gram.R, keep, lam, prior), direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", PRE_NORM_ARCHITECTURES)
def test_greedy_selection_picks_the_least_harmful_pair(arch):
    model = tiny_model(arch, num_layers=5)
    _share_qk_norms(model)
    ids = random_ids(model, batch=2, length=16)
    groups, log = select_groups(model, ids, 1, "greedy", progress=False)
    original = list(get_adapter(model).layers(model))
    losses = []
    for i in range(4):  # brute force: rebuild each candidate model and run it whole
        layers = original[:i] + [flatten_layers(model, original[i : i + 2])] + original[i + 2 :]
        hidden = embed(model, ids)
        for layer in layers:
            hidden = run_block(model, layer, hidden)
        losses.append(lm_loss(model, hidden, ids))
    best = min(range(4), key=losses.__getitem__)
    assert log[0]["flattened"] == [best, best + 1]
    assert log[0]["score"] == pytest.approx(losses[best], rel=1e-4)
    assert sum(groups, []) == list(range(5)) and len(groups) == 4


def test_similarity_selection_uses_input_output_cosine():
    model = tiny_model("llama", num_layers=5)
    ids = random_ids(model, batch=2, length=16)
    states = [inp for _i, inp, _out in iterate_blocks(model, ids)]
    states.append(list(iterate_blocks(model, ids))[-1][2])
    cosines = [torch.nn.functional.cosine_similarity(states[i], states[i + 2], dim=-1).mean() for i in range(4)]
    best = int(torch.stack(cosines).argmax())
    _groups, log = select_groups(model, ids, 1, "similarity", progress=False)
    assert log[0]["flattened"] == [best, best + 1]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_flatten_method_gives_a_standard_checkpoint(arch, tmp_path):
    """Exact flattening (pre-norm) or approximate (Gemma's post-norms), the pruned block is a
    standard one and the least-squares step lowers the block's error on the fitted tokens."""
    model = tiny_model(arch, num_layers=6)
    types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * 6)
    _share_qk_norms(model)
    widths = {n: p.shape for n, p in get_adapter(model).layers(model)[0].named_parameters()}
    calib = random_ids(model, batch=8, length=64)
    outcome = get_method("flatten", selection_blocks=2).compress(model, calib, 2)
    assert outcome.saveable and model.config.num_hidden_layers == 4
    for layer in get_adapter(model).layers(model):
        assert {n: p.shape for n, p in layer.named_parameters()} == widths
    details = outcome.details
    assert len(details["flattened_groups"]) == 2 and all(len(g) == 2 for g in details["flattened_groups"])
    assert all(types[g[0]] == types[g[1]] for g in details["flattened_groups"])  # never sliding with full
    for block in details["blocks"]:
        # The sequential target makes pruning repair the flattening error on the fitted tokens.
        assert block["pruned_error"] < block["flatten_error"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    ids = random_ids(model, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("criterion", ["magnitude", "nystrom", "ols"])
@pytest.mark.parametrize("target", ["sequential", "original", "parallel"])
def test_every_criterion_and_target_runs(criterion, target):
    model = tiny_model("mistral", num_layers=4)
    calib = random_ids(model, batch=4, length=64)
    options = FlattenOptions(criterion=criterion, target=target, groups=[[0], [1, 2], [3]])
    details = flatten_gpt(model, calib, calib, 1, options, progress=False)
    assert details["flattened_groups"] == [[1, 2]] and model.config.num_hidden_layers == 3
    assert 0 <= details["blocks"][0]["pruned_error"] < 1
    assert len(details["blocks"][0]["kept_kv_groups"]) == 2


def test_unpruned_method_keeps_double_width():
    model = tiny_model("qwen2", num_layers=4)
    calib = random_ids(model, batch=2, length=16)
    outcome = get_method("flatten_unpruned").compress(model, calib, 1)
    assert not outcome.saveable
    widths = [get_adapter(model).block(layer).mlp_out.weight.shape[1] for layer in get_adapter(model).layers(model)]
    assert sorted(widths) == [128, 128, 256]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"criterion": "best"}, "criterion must be one of"),
        ({"ridge": "abc"}, "cannot read"),
        ({"groups": "[[0, 1], [3], [2]]"}, "in order"),
        ({"bogus": 1}, "no option bogus"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(DepthkitError, match=message):
        get_method("flatten", **options).compress(model, random_ids(model), 1)


def test_too_many_blocks_for_pairs_is_an_error():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(DepthkitError, match="groups of at most 2"):
        get_method("flatten").compress(model, random_ids(model), 3)


def test_string_options_are_converted():
    options = FlattenOptions.from_dict({"ridge": "0.01", "selection_blocks": "4", "groups": "[[0, 1], [2]]"})
    assert options.ridge == 0.01 and options.selection_blocks == 4 and options.groups == [[0, 1], [2]]



def test_paper_preset_fills_in_the_papers_recipe_and_refuses_conflicts():
    paper = FlattenOptions.from_dict({"preset": "paper"}, "flatten")
    assert (paper.selection, paper.criterion, paper.target, paper.ridge_prior) == (
        "similarity", "nystrom", "parallel", "zero")
    same = FlattenOptions.from_dict({"preset": "paper", "criterion": "nystrom", "batch_size": 2}, "flatten")
    assert same.batch_size == 2
    with pytest.raises(DepthkitError, match="criterion conflict with preset paper"):
        FlattenOptions.from_dict({"preset": "paper", "criterion": "ols"}, "flatten")
    with pytest.raises(DepthkitError, match="preset must be one of"):
        FlattenOptions.from_dict({"preset": "papers"}, "flatten")
    model = tiny_model("qwen3", num_layers=6)
    report = depthkit.compress(model, "flatten", ratio=0.34, calib_ids=random_ids(model, batch=4, length=16),
                               preset="paper")
    assert report.num_layers_after == 4 and report.details["options"]["preset"] == "paper"
    assert report.deviations and "paper's recipe" in report.deviations[0] and "2602.08858" in report.paper


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_refitting_an_unpruned_block_gives_the_block_back(arch):
    """Least squares on a block that keeps every channel must return the block itself, post-norms
    included: Gemma's post-norm gains span 0 to hundreds, and a target in another per-token scale
    (or a ridge pulling towards weights of another scale) made width pruning on the real Gemma 3
    worse than no refit at all."""
    model = tiny_model(arch, num_layers=2, dtype=torch.float32)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    parts = adapter.block(layer)
    generator = torch.Generator().manual_seed(1)
    for norm in (parts.attn_post_norm, parts.mlp_post_norm):
        if norm is not None:  # gains from 0 to ~300, as in the real Gemma 3
            gains = torch.rand(norm.weight.shape, generator=generator).pow(4) * 300
            gains[0] = 0.0
            adapter.set_norm_gain(norm, gains)
    ids = random_ids(model, batch=4, length=32)
    x = embed(model, ids)
    runner = BlockRunner(model, x, batch_size=2)
    settings = FlattenOptions().prune_settings()
    _, details = GroupPruner(model, runner, settings).prune([layer], x, None)
    assert details["pruned_error"] < 1e-5, details  # squared error over the block's squared update
