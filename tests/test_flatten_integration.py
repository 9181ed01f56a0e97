"""FlattenGPT on the real SmolLM2 (truncated to 6 blocks, few tokens of real text: fast)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthkit.compress.base import get_method
from depthkit.data import DataSpec, token_blocks
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import embed, run_block

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def truncated(smollm2):
    model = copy.deepcopy(smollm2[0])
    adapter = get_adapter(model)
    adapter.set_layers(model, list(adapter.layers(model))[:6])
    return model, smollm2[1]


def _final_state(model, layers, ids) -> torch.Tensor:
    hidden = embed(model, ids)
    for layer in layers:
        hidden = run_block(model, layer, hidden)
    return hidden.float()


def _relative_error(state: torch.Tensor, reference: torch.Tensor) -> float:
    return float((state - reference).pow(2).sum() / reference.pow(2).sum())


def test_flatten_beats_dropping_the_same_blocks_and_reloads(truncated, tmp_path):
    model, tokenizer = copy.deepcopy(truncated[0]), truncated[1]
    original = list(get_adapter(model).layers(model))
    calib = token_blocks(tokenizer, DataSpec("austen:emma", "calib"), 16, 128)
    heldout = token_blocks(tokenizer, DataSpec("austen:persuasion", "heldout"), 2, 128)
    outcome = get_method("flatten", selection_blocks=2, ridge=0.05).compress(model, calib, 1)
    groups = outcome.details["flattened_groups"]
    assert model.config.num_hidden_layers == 5 and len(groups) == 1
    for block in outcome.details["blocks"]:
        assert block["pruned_error"] < block["flatten_error"]
    # A truncated model's logits mean nothing: compare its last hidden state on held-out text.
    # The merged block must keep what the pair computed: far closer than dropping the pair.
    reference = _final_state(model, original, heldout)
    dropped = [layer for i, layer in enumerate(original) if i not in groups[0]]
    drop_error = _relative_error(_final_state(model, dropped, heldout), reference)
    flat_error = _relative_error(_final_state(model, list(get_adapter(model).layers(model)), heldout), reference)
    assert flat_error < drop_error
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=model.dtype).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(heldout[:1]).logits, model(heldout[:1]).logits)
