"""Width pruning at a depth cut's parameter count: uniform widths, plain checkpoints, the budget kept."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit
from depthkit.compress import save_compressed
from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids


def block_parameters(model) -> int:
    return sum(p.numel() for layer in get_adapter(model).layers(model) for p in layer.parameters())


@pytest.mark.parametrize("method", ["width", "minitron"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_width_pruning_keeps_the_budget_and_reloads_identically(arch, method, tmp_path):
    model = tiny_model(arch, num_layers=4)
    ids = random_ids(model, batch=4, length=16)
    before = block_parameters(model)
    report = depthkit.compress(model, method, ratio=0.25, calib_ids=ids, heads_per_group=1)
    assert report.shortfall() is None  # every block kept, by design
    adapter = get_adapter(model)
    assert report.num_layers_after == 4
    assert adapter.num_heads(model.config) == adapter.num_kv_heads(model.config)  # one query head per group
    widths = report.details["widths"]
    assert widths["query_heads_per_kv_group"][1] == 1
    assert model.config.intermediate_size == widths["mlp_neurons"][1] < widths["mlp_neurons"][0]
    per_neuron = 3 * model.config.hidden_size + 2
    assert abs(block_parameters(model) - 0.75 * before) <= 4 * per_neuron / 2 + 4  # one neuron's rounding per block
    assert "Muralidharan" in report.paper if method == "minitron" else report.paper == ""
    save_compressed(model, None, tmp_path / "out", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert torch.isfinite(model(ids).logits).all()


def test_minitron_keeps_the_most_active_neurons_and_does_not_refit():
    model = tiny_model("llama", num_layers=2)
    layer = get_adapter(model).layers(model)[0]
    parts = get_adapter(model).block(layer)
    with torch.no_grad():
        parts.up.weight[:20].zero_()  # neurons 0..19 never fire
    down = parts.mlp_out.weight.detach().clone()
    report = depthkit.compress(model, "minitron", ratio=0.5, calib_ids=random_ids(model, batch=4, length=16))
    kept = report.details["widths"]["mlp_neurons"][1]
    assert kept < 108
    pruned = get_adapter(model).block(get_adapter(model).layers(model)[0])
    columns = [next(j for j in range(down.shape[1]) if torch.equal(down[:, j], pruned.mlp_out.weight[:, i]))
               for i in range(kept)]
    assert min(columns) >= 20  # no silent neuron kept, and every kept column is an original one (no refit)


def test_width_refuses_a_ratio_that_leaves_no_query_head():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(DepthkitError, match="at least 1 must stay"):
        depthkit.compress(model, "width", ratio=0.75, calib_ids=random_ids(model))
    with pytest.raises(DepthkitError, match="heads_per_group"):
        depthkit.compress(model, "minitron", ratio=0.25, calib_ids=random_ids(model), heads_per_group=5)
    assert model.config.num_hidden_layers == 4 and model.config.intermediate_size == 128
