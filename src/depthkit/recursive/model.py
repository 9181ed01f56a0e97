"""The recursive model: a block of a Hugging Face decoder's layers applied R times, R per call.

The base model is kept intact (its layers are the UNIQUE layers; a relaxed conversion shrinks
it to K layers), and `RecursiveModel` decides the order in which they run:

    prelude (once) -> step 1 of the block -> [feedback] -> step 2 -> ... -> step R
    each decoded step: coda -> final norm -> LM head  (logits of that step)

Feedback between steps is the Recursive Connector (RecursiveVLM) or the last hidden state
(vanilla recursion). With a KV cache, each application of a layer writes its own cache slot:
`prelude + step * (block + coda) + position`, so the same weights at different steps never
overwrite each other's keys and values (cache slot = step * L + l for a whole-decoder loop).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, Cache, PreTrainedModel, PreTrainedTokenizerBase

from depthkit.errors import DepthkitError, require
from depthkit.models.adapters import attention_implementation, get_adapter
from depthkit.models.blockwise import BlockContext, block_context, cache_kwargs
from depthkit.models.loading import pretrained_lm, resolve_dtype
from depthkit.recursive.config import RecursiveConfig, check_loops
from depthkit.recursive.connector import RecursiveConnector
from depthkit.recursive.export import WEIGHTS as PORTABLE_WEIGHTS
from depthkit.recursive.export import write_portable
from depthkit.recursive.lora import LoopAdapters, migrate_legacy_keys
from depthkit.utils.io import atomic_output_dir

BASE_DIR = "base"
WEIGHTS_FILE = "recursive.safetensors"
LAYER_PICKS = ("first", "stepwise")


@dataclass
class StepOutput:
    """One recursion step: its index (0-based), the block's output, the logits (None if not decoded)
    and what the LM head reads (the coda's output; None when the coda did not run at this step)."""

    step: int
    hidden: torch.Tensor
    logits: torch.Tensor | None
    final: torch.Tensor | None = None


@dataclass
class RecursiveOutput:
    logits: torch.Tensor
    step_logits: list[torch.Tensor] = field(default_factory=list)
    past_key_values: Cache | None = None


def embedding_rms(base: PreTrainedModel) -> float:
    """Root mean square of the input-embedding entries: the scale the first layer expects."""
    weight = base.get_input_embeddings().weight
    return float(weight.detach().float().pow(2).mean().sqrt())


class RecursiveModel(nn.Module):
    """A looped decoder over a supported Hugging Face causal LM (see the module docstring)."""

    def __init__(self, base: PreTrainedModel, config: RecursiveConfig):
        super().__init__()
        self.adapter = get_adapter(base)
        self._bind_architecture(base, config)
        self.base = base
        self.config = config
        hidden = base.config.hidden_size
        eps = getattr(base.config, "rms_norm_eps", 1e-6)
        self.connector = (RecursiveConnector(config, hidden, eps, embedding_rms(base))
                          if config.feedback == "connector" else None)
        self.adapters = LoopAdapters(base, config)
        self.gradient_checkpointing = False

    @classmethod
    def wrap(cls, base: PreTrainedModel, ends: int = 0, **options) -> RecursiveModel:
        """Loop the WHOLE decoder (RecursiveVLM style), or all but its first and last `ends` layers.

        With `ends` > 0 the first layers run once before the loop (a prelude) and the last ones once
        after every decoded step (a coda), as in Huginn's recurrent depth and the MIDDLE sharing of
        Relaxed Recursive Transformers: the loop then feeds hidden states back into mid-stack layers,
        and the layers that read embeddings and write for the LM head keep their single job.
        `options` are `RecursiveConfig` fields (its defaults: the measured recipe).
        """
        layers = len(get_adapter(base).layers(base))
        require(isinstance(ends, int) and ends >= 0 and 2 * ends < layers,
                f"ends must be an integer in 0..{(layers - 1) // 2} (leaving layers to loop in the {layers}-layer "
                f"decoder), got {ends!r}")
        config = RecursiveConfig(block=list(range(ends, layers - ends)), prelude=list(range(ends)),
                                 coda=list(range(layers - ends, layers)), **options)
        return cls(base, config)

    def _bind_architecture(self, base: PreTrainedModel, config: RecursiveConfig) -> None:
        """Record the base architecture in the config, or refuse a base that does not match it."""
        num_layers = len(self.adapter.layers(base))
        found = (base.config.model_type, base.config.hidden_size, num_layers)
        if config.model_type:
            expected = (config.model_type, config.hidden_size, config.num_base_layers)
            require(found == expected, f"checkpoint of another architecture: the recursive config expects "
                                       f"{expected[0]} (hidden {expected[1]}, {expected[2]} layers), the base model is "
                                       f"{found[0]} (hidden {found[1]}, {found[2]} layers)")
        config.model_type, config.hidden_size, config.num_base_layers = found
        for name in ("prelude", "block", "coda"):
            bad = [i for i in getattr(config, name) if not 0 <= i < num_layers]
            require(not bad, f"{name} layer index {bad[0] if bad else ''} out of range: the base model has "
                             f"{num_layers} layers")

    # -- forward ------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.base)

    def slot(self, step: int, position: int, loops: int) -> int:
        """KV-cache slot of the `position`-th application in `step` (block first, then coda)."""
        stride = len(self.config.step_applications(0, loops)) + len(self.config.coda)
        return len(self.config.prelude) + step * stride + position

    def step_slots(self, step: int, loops: int, with_coda: bool = True) -> list[int]:
        count = len(self.config.step_applications(step, loops)) + (len(self.config.coda) if with_coda else 0)
        return [self.slot(step, position, loops) for position in range(count)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed_tokens(self.base)(input_ids)

    def decode(self, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Final norm + LM head (on the last `logits_to_keep` positions when > 0)."""
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.adapter.lm_head(self.base)(self.adapter.final_norm(self.base)(hidden))
        return self.adapter.softcap(self.base.config, logits)

    def _apply_layer(self, layer: int, loop: int, slot: int, hidden: torch.Tensor, context: BlockContext,
               cache: Cache | None) -> torch.Tensor:
        """One application of a (shared) layer, with its loop's adapters and its own cache slot.

        The adapters are activated INSIDE the checkpointed function so that recomputation during
        backward (gradient checkpointing) sees the same loop as the forward pass.
        """
        module = self.layers[layer]

        def run(h: torch.Tensor) -> torch.Tensor:
            with self.adapters.activate(layer, loop):
                self.adapter.set_layer_index(module, slot)
                return module(h, **cache_kwargs(module, cache), **context.layer_kwargs(module))

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, hidden, use_reentrant=False)
        return run(hidden)

    def iter_steps(
        self,
        input_ids: torch.Tensor | None = None,
        num_loops: int | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        decode_all: bool = True,
        logits_to_keep: int = 0,
        context: BlockContext | None = None,
        coda_all: bool = False,
    ) -> Iterator[StepOutput]:
        """Run the recursion step by step, yielding each step (a caller may stop early: early exit).

        Only the last step is decoded unless `decode_all`. `coda_all` runs every step's coda without
        its LM head (the caller decodes `final` if it stops there): each step's coda cache slots then
        hold these positions, which later tokens exiting at that step attend to. Stopping the
        iteration early leaves the cache slots of the remaining steps unwritten for these positions;
        the caller fills them.
        """
        loops = check_loops(self.config.num_loops if num_loops is None else num_loops)
        require((input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds")
        embeddings = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        context = context or block_context(self.base, embeddings, past_key_values)
        steps = self.config.num_steps(loops)
        try:
            origin = step_input = self.run_prelude(embeddings, context, past_key_values)
            for step in range(steps):
                hidden, taps = self.run_step(step, loops, step_input, context, past_key_values)
                last = step == steps - 1
                final = logits = None
                if decode_all or coda_all or last:
                    final = self.run_coda(step, loops, hidden, context, past_key_values)
                if decode_all or last:
                    logits = self.decode(final, logits_to_keep)
                yield StepOutput(step, hidden, logits, final)
                if not last:
                    step_input = self.next_input(hidden, taps, origin, step_input, modality_ids)
        finally:
            self.reset_layer_indices()

    def reset_layer_indices(self) -> None:
        """Give every layer back its own cache index (a loop's applications move it to their slots)."""
        for index, module in enumerate(self.layers):
            self.adapter.set_layer_index(module, index)

    def run_prelude(self, hidden: torch.Tensor, context: BlockContext, cache: Cache | None) -> torch.Tensor:
        """The layers that run once before the loop (none when the whole decoder loops)."""
        for position, layer in enumerate(self.config.prelude):
            hidden = self._apply_layer(layer, 0, position, hidden, context, cache)
        return hidden

    def run_step(self, step: int, loops: int, hidden: torch.Tensor, context: BlockContext,
                 cache: Cache | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block once; returns its output and the outputs of the connector's sampled layers."""
        wanted = set(self.connector.positions) if self.connector is not None else set()
        taps = {}
        for position, (layer, loop) in enumerate(self.config.step_applications(step, loops)):
            hidden = self._apply_layer(layer, loop, self.slot(step, position, loops), hidden, context, cache)
            if position in wanted:
                taps[position] = hidden
        return hidden, [taps[p] for p in self.connector.positions] if self.connector is not None else []

    def run_coda(self, step: int, loops: int, hidden: torch.Tensor, context: BlockContext,
                 cache: Cache | None) -> torch.Tensor:
        """The layers that run once after each decoded step (none when the whole decoder loops)."""
        offset = len(self.config.step_applications(step, loops))
        for index, layer in enumerate(self.config.coda):
            hidden = self._apply_layer(layer, 0, self.slot(step, offset + index, loops), hidden, context, cache)
        return hidden

    def final_coda(self, loops: int, hidden: torch.Tensor, context: BlockContext, cache: Cache | None
                   ) -> torch.Tensor:
        """The coda of a token that stopped early, in the last step's cache slots (where it runs at
        fixed depth), so later tokens' codas find every token's final state there."""
        try:
            return self.run_coda(self.config.num_steps(loops) - 1, loops, hidden, context, cache)
        finally:
            self.reset_layer_indices()

    def next_input(self, hidden: torch.Tensor, taps: list[torch.Tensor], origin: torch.Tensor,
                   step_input: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        """Vanilla recursion feeds the last hidden state back; the connector builds a new input
        on the residual its config names: the prelude's output (the original embeddings when there
        is no prelude), this step's input, or this step's output (vanilla plus a correction)."""
        if self.connector is None:
            return hidden
        residual = {"embeddings": origin, "previous": step_input, "output": hidden}[self.config.residual]
        return self.connector(taps, residual, modality_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        num_loops: int | None = None,
        return_all_steps: bool = False,
        *,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int = 0,
    ) -> RecursiveOutput:
        """Logits after `num_loops` loops (default: the config's); every step's logits if asked."""
        outputs = list(self.iter_steps(
            input_ids, num_loops, inputs_embeds=inputs_embeds, modality_ids=modality_ids,
            past_key_values=past_key_values, decode_all=return_all_steps, logits_to_keep=logits_to_keep))
        step_logits = [o.logits for o in outputs] if return_all_steps else []
        return RecursiveOutput(outputs[-1].logits, step_logits, past_key_values)

    # -- persistence --------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Connector and adapter weights (everything that is not the plain base model)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("base.")}

    def save_pretrained(self, folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                        overwrite: bool = False, *, exit_threshold: float | None = None,
                        exit_rule: str = "kl") -> Path:
        """One folder that depthkit and plain `transformers` (remote code) both load: see `export.py`
        (`exit_threshold`/`exit_rule`: the remote code's default early exit; None = off)."""
        with atomic_output_dir(folder, overwrite) as tmp:
            write_portable(self, tmp, exit_threshold, exit_rule)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            self.config.save(tmp)
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
                        base: PreTrainedModel | None = None) -> RecursiveModel:
        """Reload a saved recursive model (optionally onto an already loaded, matching `base`); folders
        of depthkit <= 0.4 (`base/` + `recursive.safetensors`) load too."""
        folder = Path(folder)
        config = RecursiveConfig.load(folder)
        if (folder / BASE_DIR).is_dir():
            model = cls(base if base is not None else load_base(folder / BASE_DIR, dtype), config)
            model.load_extra_state(load_file(str(folder / WEIGHTS_FILE)))
            return model.to(device).eval()
        state = load_file(str(folder / PORTABLE_WEIGHTS))
        model = cls(base if base is not None else empty_base(folder, dtype), config)
        model.load_extra_state({k: v for k, v in state.items() if not k.startswith("base.")})
        if base is None:
            model.base.load_state_dict({k.removeprefix("base."): v for k, v in state.items() if k.startswith("base.")})
        return model.to(device).eval()

    def num_slots(self, loops: int) -> int:
        """KV-cache slots of a pass at `loops` loops (one per layer application)."""
        last = self.config.num_steps(loops) - 1
        return self.step_slots(last, loops)[-1] + 1

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        state = migrate_legacy_keys(state)
        expected = self.extra_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        require(not missing and not unexpected, f"recursive weights do not match the config: missing "
                                                f"{missing[:3]}, unexpected {unexpected[:3]}")
        bad = [k for k in expected if expected[k].shape != state[k].shape]
        require(not bad, f"recursive weight {bad[0] if bad else ''} has the wrong shape for this model")
        self.load_state_dict(state, strict=False)


def truncate_layers(base: PreTrainedModel, num_layers: int, pick: str = "first") -> PreTrainedModel:
    """Keep `num_layers` blocks (+ final norm and head): a cheap small model to study.

    `pick` = "first" keeps the first ones; "stepwise" keeps evenly spaced ones,
    `round(linspace(0, N-1, K))`, so the last block (whose features the head expects) stays.
    """
    adapter = get_adapter(base)
    layers = list(adapter.layers(base))
    if not 1 <= num_layers <= len(layers):
        raise DepthkitError(f"cannot keep {num_layers} layers of a {len(layers)}-layer model")
    require(pick in LAYER_PICKS, f"unknown layer pick '{pick}'; choose from {', '.join(LAYER_PICKS)}")
    kept = list(range(num_layers)) if pick == "first" else stepwise_picks(0, len(layers) - 1, num_layers)
    adapter.set_layers(base, [layers[i] for i in kept])
    return base


def stepwise_picks(first: int, last: int, count: int) -> list[int]:
    """`count` evenly spaced layer indices from `first` to `last`, both kept: `round(linspace(...))`
    (the Stepwise rule of Relaxed Recursive Transformers)."""
    return np.round(np.linspace(first, last, count)).astype(int).tolist()


def tokenizer_folder(folder: str | Path) -> Path:
    """Where a saved recursive model keeps its tokenizer (beside the weights; `base/` in old folders)."""
    folder = Path(folder)
    return folder / BASE_DIR if (folder / BASE_DIR).is_dir() else folder


def empty_base(folder: Path, dtype: str | torch.dtype) -> PreTrainedModel:
    """The base architecture of a portable looped folder, built from its config (weights loaded after)."""
    try:
        data = dict(json.loads((folder / "config.json").read_text())["base_config"])
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, KeyError, ValueError) as err:
        raise DepthkitError(f"{folder} has no valid looped-model config.json: {err}") from err
    return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype),
                                            attn_implementation=attention_implementation(config)).eval()


def load_base(folder: Path, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """The plain HF base checkpoint of a saved recursive model (no tokenizer needed)."""
    try:
        return pretrained_lm(folder, resolve_dtype(dtype))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise DepthkitError(f"could not load the base model in {folder}: {str(err).splitlines()[0]}") from err
