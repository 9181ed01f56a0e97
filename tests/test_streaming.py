"""Streaming (one block in memory) reading and writing of checkpoints, on every architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.loading import pretrained_lm
from depthkit.models.runner import iterate_blocks
from depthkit.models.streaming import INDEX_FILE, StreamingModel, StreamingWriter, peak_memory_mb
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from tests.conftest import random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_tiny(tmp_path, arch, dtype=torch.float32, **overrides):
    """A tiny model saved in several shards (so the index path is exercised)."""
    model = tiny_model(arch, num_layers=4, dtype=dtype, **overrides)
    folder = tmp_path / f"{arch}-src"
    model.save_pretrained(folder, max_shard_size="200KB")
    return model, folder


def streamed_logits(stream: StreamingModel, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    hidden = None
    for _index, _block_in, block_out in iterate_blocks(stream, ids, batch_size):
        hidden = block_out
    return stream.head(hidden)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_streaming_forward_equals_normal_forward(tmp_path, arch, tied):
    model, folder = saved_tiny(tmp_path, arch, tie_word_embeddings=tied)
    assert (folder / INDEX_FILE).exists()
    ids = random_ids(model, batch=3, length=20)
    stream = StreamingModel.open(folder, dtype="float32")
    torch.testing.assert_close(streamed_logits(stream, ids, batch_size=2), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streaming_blocks_equal_blockwise_blocks_in_bf16(tmp_path, arch):
    _, folder = saved_tiny(tmp_path, arch)
    loaded = pretrained_lm(folder, torch.bfloat16).eval()
    ids = random_ids(loaded, batch=2, length=16)
    stream = StreamingModel.open(folder, dtype="bfloat16")
    pairs = zip(iterate_blocks(stream, ids), iterate_blocks(loaded, ids), strict=True)
    for (i, s_in, s_out), (j, n_in, n_out) in pairs:
        assert i == j and s_out.dtype == torch.bfloat16
        torch.testing.assert_close(s_in, n_in, atol=0, rtol=0)
        torch.testing.assert_close(s_out, n_out, atol=0, rtol=0)


def test_only_the_requested_block_is_materialised(tmp_path):
    _, folder = saved_tiny(tmp_path, "llama")
    stream = StreamingModel.open(folder, dtype="float32")
    layer = stream.load_layer(2)
    assert all(not p.is_meta for p in layer.parameters())
    assert all(p.is_meta for p in get_adapter(stream.model).layers(stream.model).parameters())
    on_disk = {name for name, p in stream.model.named_parameters(remove_duplicate=False) if p.is_meta}
    # besides the blocks, only the embedding and the head, read when used (`embed`, `head`)
    assert {name for name in on_disk if ".layers." not in name} == {"model.embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(DepthkitError, match="out of range"):
        stream.load_layer(4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_writer_round_trip_with_a_block_removed(tmp_path, arch):
    model, folder = saved_tiny(tmp_path, arch, tie_word_embeddings=arch == "llama")
    (folder / "tokenizer_config.json").write_text("{}")  # non-weight files are carried over
    stream = StreamingModel.open(folder, dtype="float32")
    out = tmp_path / "written"
    keep = [0, 2, 3]
    with StreamingWriter(out, stream.config) as writer:
        writer.write_non_layer(stream)
        for new_index, old_index in enumerate(keep):
            writer.write_layer(new_index, stream.load_layer(old_index))
    adapter = get_adapter(model)
    adapter.set_layers(model, [adapter.layers(model)[i] for i in keep])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3 and (out / INDEX_FILE).exists()
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert len(json.loads((out / INDEX_FILE).read_text())["weight_map"]) == len(reloaded.state_dict()) - (
        1 if arch == "llama" else 0)  # a tied head is stored once
    ids = random_ids(model)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_writer_casts_dtype_and_writes_a_shard_per_block(tmp_path):
    model, folder = saved_tiny(tmp_path, "qwen3")
    stream = StreamingModel.open(folder, dtype="float32")
    out = tmp_path / "bf16"
    writer = StreamingWriter(out, stream.config, dtype="bfloat16")
    writer.write_non_layer(stream)
    for index in range(stream.num_layers):
        writer.write_layer(index, stream.load_layer(index))
    assert not out.exists()  # nothing is published before finish()
    writer.finish()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    shards = set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) == stream.num_layers + 1  # the rest of the model, then one shard per block
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.num_hidden_layers == 4


def test_interrupted_writer_leaves_nothing(tmp_path):
    _, folder = saved_tiny(tmp_path, "mistral")
    stream = StreamingModel.open(folder, dtype="float32")
    out = tmp_path / "never"
    with pytest.raises(DepthkitError, match="in order"), StreamingWriter(out, stream.config) as writer:
        writer.write_non_layer(stream)
        writer.write_layer(1, stream.load_layer(1))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(DepthkitError, match="no config.json"):
        StreamingModel.open(tmp_path)
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(DepthkitError, match="safetensors checkpoint"):
        StreamingModel.open(tmp_path)


def test_peak_memory_reports_positive_figures():
    peaks = peak_memory_mb()
    assert peaks["ru_maxrss_mb"] > 10
    if "vmhwm_mb" in peaks:
        assert peaks["vmhwm_mb"] >= peaks["vmrss_mb"] > 10


@pytest.mark.integration
def test_streaming_smollm2_equals_loaded_model(smollm2):
    from depthkit.models.loading import default_model_dir

    model, _ = smollm2
    ids = random_ids(model, batch=1, length=32)
    stream = StreamingModel.open(default_model_dir())  # the same "auto" dtype as the loaded model
    assert stream.num_layers == 30 and stream.dtype == model.dtype
    torch.testing.assert_close(streamed_logits(stream, ids), model(ids).logits, atol=0, rtol=0)


def test_freed_memory_goes_back_to_the_os_on_glibc():
    import platform

    from depthkit.models.streaming import return_freed_memory_to_os

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert return_freed_memory_to_os() is expected
