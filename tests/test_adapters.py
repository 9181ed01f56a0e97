import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter, supported_model_types
from tests.conftest import random_ids


def test_supported_architectures():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(DepthkitError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        get_adapter(GPT2Config())


def test_block_parts_have_the_config_shapes(tiny):
    adapter = get_adapter(tiny)
    config = tiny.config
    heads, kv, dim = adapter.num_heads(config), adapter.num_kv_heads(config), adapter.head_dim(config)
    for layer in adapter.layers(tiny):
        parts = adapter.block(layer)
        assert parts.query.weight.shape == (heads * dim, config.hidden_size)
        assert parts.key.weight.shape == (kv * dim, config.hidden_size)
        assert parts.attn_out.weight.shape == (config.hidden_size, heads * dim)
        assert parts.mlp_out.weight.shape == (config.hidden_size, adapter.intermediate_size(config))
        assert (parts.q_norm is not None) == (config.model_type in ("qwen3", "gemma3_text"))
        assert (parts.attn_post_norm is not None) == config.model_type.startswith("gemma")


def test_set_layers_keeps_a_reloadable_checkpoint(tiny, tmp_path):
    adapter = get_adapter(tiny)
    kept = [adapter.layers(tiny)[i] for i in (0, 2, 3)]
    adapter.set_layers(tiny, kept)
    assert tiny.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in adapter.layers(tiny)] == [0, 1, 2]
    ids = random_ids(tiny)
    with torch.no_grad():
        expected = tiny(ids).logits
    tiny.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)
