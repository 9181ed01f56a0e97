"""Recursive machinery on the real SmolLM2-135M (truncated to 2 layers, float32, few tokens)."""

from __future__ import annotations

import pytest
import torch

from depthkit.data import DataSpec, token_blocks
from depthkit.models.loading import load_model
from depthkit.recursive import RecursiveModel, truncate_layers
from depthkit.recursive.generate import generate
from depthkit.recursive.relaxed import relax

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model(dtype="float32")
    truncate_layers(model, 2)
    ids = token_blocks(tokenizer, DataSpec("austen:persuasion", "heldout"), 1, 16)
    return model, tokenizer, ids


def test_smollm2_loop_relax_and_generate(smollm2, tmp_path):
    base, tokenizer, ids = smollm2
    reference = base(ids).logits
    wrapped = RecursiveModel.wrap(base, num_loops=2, connector_k=2, residual="embeddings", scale_init=0.0)
    torch.testing.assert_close(wrapped(ids, num_loops=1).logits, reference, atol=1e-4, rtol=0)
    steps = wrapped(ids, num_loops=2, return_all_steps=True).step_logits
    torch.testing.assert_close(steps[1], reference, atol=1e-4, rtol=0)  # connector scale 0
    wrapped.adapters.detach()

    relaxed = relax(base, 1, "cycle", "average", rank="full", loop_norms="original")
    torch.testing.assert_close(relaxed(ids).logits, reference, atol=2e-3, rtol=0)
    cached = generate(relaxed, ids[:, :8], 3)
    assert cached.new_tokens == generate(relaxed, ids[:, :8], 3, use_cache=False).new_tokens
    relaxed.save_pretrained(tmp_path / "ck", tokenizer)
    reloaded = RecursiveModel.from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(reloaded(ids).logits, relaxed(ids).logits, atol=0, rtol=0)
