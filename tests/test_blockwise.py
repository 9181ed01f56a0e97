import warnings

import torch

from depthkit.evaluate.speed import measure_speed
from depthkit.models.blockwise import logits_from_hidden
from depthkit.models.runner import iterate_blocks
from depthkit.recursive import RecursiveModel
from depthkit.recursive.generate import generate
from tests.conftest import random_ids


def test_block_by_block_equals_the_full_forward(tiny):
    ids = random_ids(tiny, batch=3, length=20)
    with torch.no_grad():
        full = tiny(ids, output_hidden_states=True)
    outputs = []
    for index, block_in, block_out in iterate_blocks(tiny, ids, batch_size=2):
        torch.testing.assert_close(block_in, full.hidden_states[index])
        outputs.append(block_out)
    assert len(outputs) == tiny.config.num_hidden_layers
    torch.testing.assert_close(logits_from_hidden(tiny, outputs[-1]), full.logits)


def test_cached_decoding_uses_the_installed_cache_keyword(tiny):
    """transformers renamed `past_key_values` to `cache` in v5 and will drop the old name: our layer
    calls, masks and decode loop must pass the name the installed version declares (no deprecation)."""
    looped = RecursiveModel.wrap(tiny, num_loops=2, ends=1, connector_k=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(looped, random_ids(tiny, batch=1, length=5), 3, exit_threshold=1e-3)
        measure_speed(tiny, batch_sizes=(1,), seq_lens=(8,), prompt_len=8, new_tokens=2, repeats=1, progress=False)
    renamed = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not renamed, renamed[0] if renamed else ""
