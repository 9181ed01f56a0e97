import torch

from depthkit.models.blockwise import iterate_blocks, logits_from_hidden
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
