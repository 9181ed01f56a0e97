"""Memory-bounded models: read and write a checkpoint one decoder block at a time.

Block-by-block calibration (`depthkit.models.runner`) keeps one block's activations in memory,
but a normally loaded model still holds every block's weights. For models larger than RAM (or
GPU memory) `StreamingModel` builds the model on the `meta` device from its config (no memory),
materialises only the small non-block parts (final norm, rotary tables; the embedding matrix and
LM head are read when used) and reads ONE decoder block at a time from the memory-mapped
safetensors files. `StreamingWriter` is the mirror image: it saves a new checkpoint block by
block (sharded safetensors + index + config), so a compressed model never needs to exist whole
in memory either. The two are the streamed backends of the block runner's source and sink.

API (what `depthkit compress --offload disk` builds on)::

    source = StreamingModel.open(folder, device="cpu")   # dtype "auto": bf16 where native, else fp32
    source.num_layers                      # blocks in the checkpoint
    hidden = source.embed(ids)             # block 0's input
    layer = source.load_layer(i)           # a fresh, materialised nn.Module (drop it to free it)
    layers = source.layers()               # a sequence that loads block i on `layers[i]`
    logits = source.head(hidden)           # final norm + LM head
    for i, block_in, block_out in iterate_blocks(source, ids): ...   # models.runner, as in memory

    with StreamingWriter(out, source.config, overwrite=False) as writer:
        writer.write_non_layer(source)     # embeddings, final norm, head, copied from the files
                                           # (+ tokenizer files)
        writer.write_layer(0, layer)       # blocks in order 0..n-1, any n
        ...                                # finish() runs on leaving the block (or call it)

The writer fills a temporary folder that becomes `out` only when `finish()` succeeds
(`atomic_output_dir`): an interrupted run never leaves a checkpoint that looks complete.
`peak_memory_mb()` reports the process's peak resident memory (ru_maxrss and VmHWM).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
import os
import resource
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from depthkit.errors import DepthkitError, require
from depthkit.models.adapters import attention_implementation, get_adapter, module_prefix
from depthkit.models.loading import checkpoint_config, resolve_dtype
from depthkit.utils.io import atomic_output_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a checkpoint folder that describe weights; everything else (tokenizer, generation
# config, chat template) is carried over unchanged by the writer.
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def meta_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` with every parameter on the `meta` device: structure, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config))
    get_adapter(model)  # refuse unsupported architectures up front
    return model.eval()


def checkpoint_index(folder: Path) -> dict[str, str]:
    """Map every tensor name of a safetensors checkpoint folder to the file that holds it."""
    if (folder / INDEX_FILE).exists():
        return dict(json.loads((folder / INDEX_FILE).read_text())["weight_map"])
    require((folder / SINGLE_FILE).exists(),
            f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: streaming needs a safetensors checkpoint")
    with safe_open(folder / SINGLE_FILE, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


class StreamingModel:
    """A checkpoint whose decoder blocks stay on disk until asked for, one at a time: the streamed
    backend of the block runner (`depthkit.models.runner.BlockSource`)."""

    keeps_blocks = False  # blocks a method builds are rebuilt from their recipe, never all held

    def __init__(self, folder: Path, skeleton: PreTrainedModel, device: torch.device, dtype: torch.dtype):
        self.folder = folder
        self.model = skeleton  # non-block parts materialised, blocks on `meta`
        self.device = device
        self.dtype = dtype
        self.adapter = get_adapter(skeleton)
        self.index = checkpoint_index(folder)
        self.layers_prefix = module_prefix(skeleton, self.adapter.layers(skeleton))

    @classmethod
    def open(cls, folder: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto") -> StreamingModel:
        """Read the config, build the meta skeleton and load only the non-block weights."""
        folder = Path(folder)
        require((folder / "config.json").exists(), f"{folder} is not a Hugging Face model folder (no config.json)")
        skeleton = meta_skeleton(checkpoint_config(folder))
        stream = cls(folder, skeleton, torch.device(device), resolve_dtype(dtype, device))
        stream._materialise_non_layer()
        return stream

    # -- what the checkpoint holds -----------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    def layers(self) -> LazyLayers:
        """The blocks as a read-only sequence that loads block i from disk on `[i]`."""
        return LazyLayers(self)

    def parameter_count(self) -> int:
        """Parameters stored in the checkpoint, counted from the file headers (nothing is read)."""
        total = 0
        for filename in sorted(set(self.index.values())):
            names = [name for name, file in self.index.items() if file == filename]
            with safe_open(self.folder / filename, framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
        return total

    def layer_keys(self, index: int) -> list[str]:
        prefix = f"{self.layers_prefix}.{index}."
        return [key for key in self.index if key.startswith(prefix)]

    def read_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors from the memory-mapped files, cast floats to the working dtype.

        Each file is opened only for the read and closed right after, so the mapped pages of
        blocks already processed do not accumulate in the process's resident memory.
        """
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.index[key], []).append(key)
        tensors = {}
        for filename, names in by_file.items():
            with safe_open(self.folder / filename, framework="pt", device=str(self.device)) as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return tensors

    # -- materialising ------------------------------------------------------------------------
    def _materialise_non_layer(self) -> None:
        """Load the final norm and other small non-block weights; rebuild rotary tables.

        The input embedding and the LM head stay on disk (meta here): with a large vocabulary they
        are as big as several blocks (2 x 1 GB for a 128k-token vocabulary at width 4096), and they
        are only needed once, to embed the calibration tokens (`embed`) or to decode (`head`).
        """
        keys = [key for key in self._non_layer_keys() if key not in self._vocab_keys()]
        self.model.load_state_dict(self.read_tensors(keys), strict=False, assign=True)
        decoder = self.adapter.decoder(self.model)
        with torch.device(self.device):  # rotary tables are computed from the config, not stored
            decoder.rotary_emb = type(decoder.rotary_emb)(config=self.config)
        on_disk = {self._embedding_key(), module_prefix(self.model, self.adapter.lm_head(self.model)) + ".weight"}
        missing = [name for name, tensor in self.model.state_dict().items()
                   if tensor.is_meta and not name.startswith(f"{self.layers_prefix}.") and name not in on_disk]
        require(not missing, f"checkpoint {self.folder} lacks {', '.join(missing[:5])}")

    def _non_layer_keys(self) -> list[str]:
        return [key for key in self.index if not key.startswith(f"{self.layers_prefix}.")]

    def _embedding_key(self) -> str:
        return module_prefix(self.model, self.adapter.embed_tokens(self.model)) + ".weight"

    def _head_key(self) -> str:
        """The LM head's weight in the files: its own, or the embedding's when they are tied."""
        key = module_prefix(self.model, self.adapter.lm_head(self.model)) + ".weight"
        return key if key in self.index else self._embedding_key()

    def _vocab_keys(self) -> set[str]:
        keys = {self._embedding_key(), self._head_key()}
        require(keys <= set(self.index), f"checkpoint {self.folder} lacks {', '.join(sorted(keys - set(self.index)))}")
        return keys

    def non_layer_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder blocks, read from the files (as the writer copies them)."""
        return self.read_tensors(self._non_layer_keys())

    def load_layer(self, index: int) -> nn.Module:
        """Block `index` as a fresh module on the device (the skeleton keeps its meta copy)."""
        require(0 <= index < self.num_layers, f"layer {index} out of range 0..{self.num_layers - 1}")
        prefix = f"{self.layers_prefix}.{index}."
        state = {key[len(prefix):]: tensor for key, tensor in self.read_tensors(self.layer_keys(index)).items()}
        layer = copy.deepcopy(self.adapter.layers(self.model)[index])
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise DepthkitError(f"block {index} of {self.folder} does not match its config: {err}") from err
        return layer.eval().requires_grad_(False)

    # -- computing ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Block 0's input; the embedding matrix is read for the call and freed after it."""
        weight = self.read_tensors([self._embedding_key()])[self._embedding_key()]
        embeddings = F.embedding(input_ids.to(self.device), weight)
        scale = self.adapter.embed_scale(self.model)
        return embeddings if scale == 1.0 else embeddings * torch.tensor(scale, dtype=weight.dtype)

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head; the head's weight is read for the call and freed after it."""
        weight = self.read_tensors([self._head_key()])[self._head_key()]
        return self.adapter.softcap(self.config, F.linear(self.adapter.final_norm(self.model)(hidden), weight))


class LazyLayers(Sequence):
    """Decoder blocks of a `StreamingModel`, each loaded from disk when indexed.

    Code written for `adapter.layers(model)` that reads one block at a time (e.g. FlattenGPT's
    front-to-back pruning) runs unchanged on a checkpoint larger than memory: every access
    returns a fresh module that is freed once the caller drops it.
    """

    def __init__(self, source: StreamingModel):
        self.source = source

    def __len__(self) -> int:
        return self.source.num_layers

    def __getitem__(self, index: int) -> nn.Module:
        require(isinstance(index, int), "streamed blocks are read one at a time (an int index)")
        return self.source.load_layer(index if index >= 0 else index + len(self))


class StreamingWriter:
    """Write a checkpoint block by block into sharded safetensors, atomically.

    Every block (and the rest of the model, once) is written at once as its own shard, so the
    writer never holds more than the block it is given (buffering several blocks per shard
    would cost more memory, on a small model, than the block being compressed). Use it as a
    context manager: leaving the block normally calls `finish()`, an exception discards
    everything written so far.
    """

    def __init__(self, out: str | Path, config: PretrainedConfig, dtype: str | torch.dtype | None = None,
                 overwrite: bool = False):
        self.out = Path(out)
        self.config = copy.deepcopy(config)
        self.dtype = resolve_dtype(dtype) if dtype is not None else None
        skeleton = meta_skeleton(self.config)
        self.adapter = get_adapter(skeleton)
        self.layers_prefix = module_prefix(skeleton, self.adapter.layers(skeleton))
        self._skeleton = skeleton
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_output_dir(self.out, overwrite))
        self._shards: list[tuple[str, list[str]]] = []
        self._layer_types: list[str] = []
        self._source: Path | None = None
        self._written_dtype: torch.dtype | None = None
        self._extra_files: dict[str, str] = {}
        self._widths: tuple[int, int] | None = None
        self.parameters = 0  # parameters written so far
        # Those in tensors that are not entirely zero, as `count_parameters` counts them in memory
        # (attention drop stores dropped sublayers as zeros: the card must not count them as kept).
        self.effective_parameters = 0
        self._done = False

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # removes the temporary folder
        elif not self._done:
            self.finish()

    # -- adding tensors ----------------------------------------------------------------------
    def write_layer(self, index: int, layer: nn.Module) -> None:
        """Add block `index`; blocks must come in order 0, 1, 2, ..."""
        require(index == len(self._layer_types),
                f"blocks must be written in order: expected block {len(self._layer_types)}, got {index}")
        self._add(layer.state_dict(), f"{self.layers_prefix}.{index}.")
        self._layer_types.append(self.adapter.layer_type(layer, self.config))

    def write_non_layer(self, source: StreamingModel | PreTrainedModel) -> None:
        """Add every tensor outside the decoder blocks (tied copies once), and remember a
        `StreamingModel`'s folder so its tokenizer and generation config are carried over."""
        if isinstance(source, StreamingModel):
            self._add(source.non_layer_state(), "")
            self._source = source.folder
            return
        prefix = module_prefix(source, get_adapter(source).layers(source)) + "."
        tied = set((getattr(source, "all_tied_weights_keys", None) or {}) if source.config.tie_word_embeddings else ())
        self._add({k: v for k, v in source.state_dict().items() if not k.startswith(prefix) and k not in tied}, "")

    def _add(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Write `state` as the next shard."""
        shard = {}
        for name, tensor in state.items():
            tensor = tensor.detach().to("cpu")
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            if tensor.is_floating_point() and self._written_dtype is None:
                self._written_dtype = tensor.dtype
            shard[prefix + name] = tensor.contiguous().clone()
            self.parameters += tensor.numel()
            self.effective_parameters += tensor.numel() if bool(tensor.any()) else 0
        if shard:
            name = f"shard-{len(self._shards):05d}.safetensors"
            save_file(shard, self._tmp / name, metadata={"format": "pt"})
            self._shards.append((name, list(shard)))

    def set_widths(self, heads: int, intermediate: int) -> None:
        """Every block has `heads` query heads and `intermediate` MLP neurons (width pruning): the config says so."""
        self._widths = (heads, intermediate)

    @property
    def num_layers(self) -> int:
        """Blocks written so far."""
        return len(self._layer_types)

    def write_text(self, name: str, text: str) -> None:
        """A small extra file (e.g. a compression card) published with the checkpoint."""
        self._extra_files[name] = text

    # -- closing -------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Name the shards, write the index and the config for the written depth, publish `out`."""
        require(not self._done, "this writer has already finished")
        require(bool(self._layer_types), "no decoder block was written")
        self._name_shards()
        self._write_config()
        if self._source is not None:
            for path in self._source.iterdir():
                if path.is_file() and not path.name.endswith(_WEIGHT_FILES) and path.name != "config.json":
                    shutil.copy2(path, self._tmp / path.name)
        for name, text in self._extra_files.items():
            (self._tmp / name).write_text(text)
        self._done = True
        self._stack.close()  # renames the temporary folder to `out`
        return self.out

    def _name_shards(self) -> None:
        count = len(self._shards)
        weight_map, total = {}, 0
        for number, (name, keys) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self._tmp / name, self._tmp / final)
            weight_map.update(dict.fromkeys(keys, final))
            total += (self._tmp / final).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write_config(self) -> None:
        """Config for the written depth, by the same rules as in-memory edits (`set_layers`)."""
        config = self._skeleton.config
        self.adapter.set_depth(config, self._layer_types)
        if self._widths is not None:
            self.adapter.set_widths(self._skeleton, *self._widths)
        config.dtype = self._written_dtype or config.dtype  # what the files hold, so loads need no cast
        config.save_pretrained(self._tmp)


def return_freed_memory_to_os(threshold: int = 64 * 2**10) -> bool:
    """Ask glibc to serve allocations above `threshold` bytes with their own mappings.

    Block-by-block work allocates and frees activation-sized tensors over and over; from the
    default heap, freed chunks stay resident (fragmentation: about 100 MiB in the memory benchmark
    on SmolLM2), so the peak creeps above what is live. Own mappings go back to the OS on free.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process in MiB: `ru_maxrss` and, on Linux, VmHWM."""
    peaks = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key = "vmhwm_mb" if line.startswith("VmHWM") else "vmrss_mb"
                peaks[key] = int(line.split()[1]) / 1024
    return peaks
