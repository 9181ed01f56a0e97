"""A depthkit looped (recursive) model for plain `transformers`, as remote code.

depthkit copies this file into every looped checkpoint it saves and registers it in `config.json`
(`auto_map`), so anyone with `transformers` alone can load and generate:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.generate(**tokenizer("It is a truth", return_tensors="pt"), max_new_tokens=20)

It imports nothing from depthkit: everything depthkit knows about the base architecture (where each
projection and norm of a block sits, the norm gain offset, each layer's attention type) and about
the loop (prelude, block, coda, loop order, the Recursive Connector, the per-loop and shared LoRA
adapters with their shapes) is written into the config at save time. The computation is depthkit's
`RecursiveModel`: prelude once, then R steps of the block (the connector builds each next step's
input), coda + final norm + LM head after the last step; every application of a layer has its own
KV-cache slot (`prelude + step * (block + coda) + position`). A depthkit test checks logits and
greedy tokens against `RecursiveModel` on every architecture it supports.

Early exit (off by default) is depthkit's per-token rule (`depthkit.recursive.generate`): after each
step r >= 2 of a new token, a distance to step r-1 is measured and, below the threshold, the token
stops and is predicted from step r. `exit_rule` "kl" (Huginn; the default) compares the two steps'
next-token distributions, so it runs the coda and LM head at every step; "hidden" compares the
block's outputs, ||h_r - h_{r-1}|| / ||h_r||, and runs the head only at exit. Turn it on in the
config (`exit_threshold`, `exit_rule`: saved by depthkit when asked, or `from_pretrained(...,
exit_threshold=1e-3)`) or per call (`generate(..., exit_threshold=1e-3, exit_rule="hidden")`, which
`generate` passes on to `forward`; a per-call value wins, and `model.config.exit_threshold = None`
turns a saved one off). Decisions are per token, as in depthkit's own `generate`: only a forward of
ONE new token of ONE sequence, after its prompt is in the KV cache, may exit. A batch of several
sequences runs all R steps exactly as with early exit off (depthkit batches early exit in `depthkit
serve`); so does a forward of several tokens, such as the prompt, except that with one sequence and
the "kl" rule it also runs every step's coda, so that each step's coda cache slots hold the prompt
for later tokens that exit there.
A token that exits at step r runs the coda once: "kl" has run step r's already; "hidden" runs it
then, in the LAST step's cache slots, where the coda runs at fixed depth (so every token's coda
attends to each earlier token's final state). Its cache slots of the skipped steps r+1..R get a copy
of its step-r keys and values (the coda's too under "kl"), so later tokens at those steps find an
entry for it ("reuse the latest KV"). `model.steps_used` lists the steps each forward ran since the cache was
last empty (after `generate`: the prompt's R first, then one entry per further new token).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast


class DepthkitLoopedConfig(PretrainedConfig):
    """The base model's config, the loop plan and what the loop's extra modules look like."""

    model_type = "depthkit_looped"

    def __init__(self, base_config: dict | None = None, loop: dict | None = None,
                 exit_threshold: float | None = None, exit_rule: str = "kl", **kwargs):
        self.base_config = base_config or {}
        self.loop = loop or {}
        # Early exit (see the module docstring): None runs every token through all R steps.
        self.exit_threshold = exit_threshold
        self.exit_rule = exit_rule
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        data = dict(self.base_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)


def _resolve(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


class LoRA(nn.Module):
    """delta(x) = scaling * B A x (+ bias delta)."""

    def __init__(self, rank: int, in_features: int, out_features: int, scaling: float, bias: bool):
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return delta + self.bias if self.bias is not None else delta


class ConnectorRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RecursiveConnector(nn.Module):
    """Next step's input = residual + scale * sum over sampled layers of projection(RMSNorm(feature))."""

    def __init__(self, spec: dict, hidden: int):
        super().__init__()
        self.positions, self.relative = spec["positions"], spec["relative"]
        count = len(self.positions)
        self.norms = nn.ModuleList(ConnectorRMSNorm(hidden, spec["eps"]) for _ in range(count))
        linear = spec["projection"] == "linear"
        self.projections = nn.ModuleList(
            nn.Linear(hidden, hidden, bias=False) if linear
            else nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)) for _ in range(count))
        self.fuse_logits = nn.Parameter(torch.zeros(count)) if spec["fuse"] == "weighted" else None
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, taps: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.fuse_logits, 0) if self.fuse_logits is not None else None
        fused = None
        for index, feature in enumerate(taps):
            projected = self.projections[index](self.norms[index](feature.to(self.scale.dtype)))
            if weights is not None:
                projected = projected * weights[index].to(projected.dtype)
            fused = projected if fused is None else fused + projected
        if self.relative:
            fused = fused * residual.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
        return residual + (self.scale[0] * fused).to(residual.dtype)


class LoopAdapters(nn.Module):
    """Per-loop LoRA (`relax`), shared LoRA and per-loop norm gains, applied by forward hooks to the
    layer application marked `active` (layer, loop)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.relax = nn.ModuleDict({k: LoRA(*shape) for k, shape in spec.get("relax", {}).items()})
        self.shared = nn.ModuleDict({k: LoRA(*shape) for k, shape in spec.get("shared", {}).items()})
        self.norms = nn.ParameterDict({k: nn.Parameter(torch.ones(size)) for k, size in spec.get("norms", {}).items()})
        self.norm_offset = spec.get("norm_offset", 0.0)
        self.active: tuple[int, int] | None = None

    def attach(self, layers: nn.ModuleList, paths: dict[str, str]) -> None:
        for layer_index, layer in enumerate(layers):
            for role, path in paths.items():
                prefix = f"{layer_index}_{role}"
                in_relax = any(key.startswith(prefix + "_loop") for key in self.relax)
                if in_relax or prefix in self.shared:
                    _resolve(layer, path).register_forward_hook(self._linear_hook(layer_index, role))
                if any(key.startswith(prefix + "_loop") for key in self.norms):
                    _resolve(layer, path).register_forward_hook(self._norm_hook(layer_index, role))

    def _linear_hook(self, layer: int, role: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.active is None or self.active[0] != layer:
                return output
            shared, relaxed = f"{layer}_{role}", f"{layer}_{role}_loop{self.active[1]}"
            for key, container in ((shared, self.shared), (relaxed, self.relax)):
                if key in container:
                    output = output + container[key](args[0]).to(output.dtype)
            return output

        return hook

    def _norm_hook(self, layer: int, role: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            key = f"{layer}_{role}_loop{self.active[1]}" if self.active is not None else None
            if self.active is None or self.active[0] != layer or key not in self.norms:
                return output
            eps = getattr(module, "variance_epsilon", None) or module.eps
            x = args[0].float()
            normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            weight = self.norms[key]
            if self.norm_offset:
                return (normalised * (self.norm_offset + weight.float())).to(output.dtype)
            return weight.to(output.dtype) * normalised.to(args[0].dtype)

        return hook

    @contextlib.contextmanager
    def activate(self, layer: int, loop: int) -> Iterator[None]:
        previous, self.active = self.active, (layer, loop)
        try:
            yield
        finally:
            self.active = previous


def _takes(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


# depthkit.recursive.generate.EXIT_RULES, repeated here (no depthkit import); a depthkit test checks they agree.
EXIT_RULES = ("kl", "hidden")
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DepthkitLoopedForCausalLM(PreTrainedModel, GenerationMixin):
    """The looped model (see the module docstring); `generate` works as for any causal LM."""

    config_class = DepthkitLoopedConfig
    base_model_prefix = "looped"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def __init__(self, config: DepthkitLoopedConfig):
        super().__init__(config)
        loop = config.loop
        self.base = AutoModelForCausalLM.from_config(config.base(), attn_implementation=loop.get("attention"))
        self.connector = (RecursiveConnector(loop["connector"], config.base().hidden_size)
                          if loop.get("connector") else None)
        self.adapters = LoopAdapters(loop.get("adapters", {}))
        self.adapters.attach(self._layers(), loop["parts"]["projections"] | loop["parts"]["norms"])
        self.steps_used: list[int] = []  # steps run by each forward since the cache was empty
        self.post_init()

    # -- modules -------------------------------------------------------------------------------
    def _module(self, role: str) -> nn.Module:
        return _resolve(self.base, self.config.loop["parts"][role])

    def _layers(self) -> nn.ModuleList:
        return self._module("layers")

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    # -- the loop --------------------------------------------------------------------------------
    def _applications(self, step: int) -> list[tuple[int, int]]:
        loop = self.config.loop
        if loop["order"] == "cycle":
            return [(layer, step) for layer in loop["block"]]
        return [(layer, index) for layer in loop["block"] for index in range(loop["num_loops"])]

    def _slot(self, step: int, position: int) -> int:
        loop = self.config.loop
        return len(loop["prelude"]) + step * (len(self._applications(0)) + len(loop["coda"])) + position

    def _context(self, hidden: torch.Tensor, attention_mask, cache, position_ids: torch.Tensor) -> dict:
        base_config = self.base.config
        keyword = "cache" if _takes(create_causal_mask, "cache") else "past_key_values"
        args = {"config": base_config, "inputs_embeds": hidden, "attention_mask": attention_mask, keyword: cache,
                "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**args)}
        if getattr(base_config, "sliding_window", None):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
        rotary = self._module("rotary")
        kinds = set(self.config.loop["layer_types"]) | {"full_attention"}
        if _takes(type(rotary).forward, "layer_type"):
            tables = {kind: rotary(hidden, position_ids, kind) for kind in kinds & set(base_config.layer_types)}
        else:
            tables = dict.fromkeys(kinds, rotary(hidden, position_ids=position_ids))
        return {"masks": masks, "tables": tables, "position_ids": position_ids}

    def _apply(self, layer_index: int, loop: int, slot: int, hidden: torch.Tensor, context: dict, cache
               ) -> torch.Tensor:
        layer = self._layers()[layer_index]
        attention = _resolve(layer, self.config.loop["parts"]["attention"])
        attention.layer_idx = slot
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = slot
        kind = self.config.loop["layer_types"][layer_index]
        kind = kind if kind in context["masks"] else "full_attention"
        keyword = "cache" if _takes(type(layer).forward, "cache") else "past_key_values"
        with self.adapters.activate(layer_index, loop):
            return layer(hidden, attention_mask=context["masks"][kind], position_ids=context["position_ids"],
                         position_embeddings=context["tables"][kind], use_cache=cache is not None,
                         **{keyword: cache})

    def _num_steps(self) -> int:
        """Decodable steps: R in CYCLE order; SEQUENCE order repeats each layer in place, one step in all."""
        loop = self.config.loop
        return loop["num_loops"] if loop["order"] == "cycle" else 1

    def _step_slots(self, step: int, with_coda: bool) -> list[int]:
        """The cache slots of one step's layer applications, block then (`with_coda`) coda."""
        count = len(self._applications(step)) + (len(self.config.loop["coda"]) if with_coda else 0)
        return [self._slot(step, position) for position in range(count)]

    def _steps(self, hidden: torch.Tensor, context: dict, cache, coda_all: bool
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Prelude, then the block step by step: yields (step, block output, coda output). The coda runs
        after the last step, and after every step when `coda_all` (its output is None where it did not run).
        A caller that stops early leaves the remaining steps' cache slots unwritten for these positions."""
        loop = self.config.loop
        for position, layer in enumerate(loop["prelude"]):
            hidden = self._apply(layer, 0, position, hidden, context, cache)
        origin = step_input = hidden
        steps = self._num_steps()
        taps_at = set(self.connector.positions) if self.connector is not None else set()
        for step in range(steps):
            hidden, taps = step_input, {}
            for position, (layer, index) in enumerate(self._applications(step)):
                hidden = self._apply(layer, index, self._slot(step, position), hidden, context, cache)
                if position in taps_at:
                    taps[position] = hidden
            last = step == steps - 1
            yield step, hidden, self._coda(step, hidden, context, cache) if coda_all or last else None
            if last:
                return
            if self.connector is None:
                step_input = hidden
            else:
                residual = {"embeddings": origin, "previous": step_input, "output": hidden}[loop["residual"]]
                step_input = self.connector([taps[p] for p in self.connector.positions], residual)

    def _coda(self, step: int, hidden: torch.Tensor, context: dict, cache) -> torch.Tensor:
        """The layers after the loop, in `step`'s own cache slots (each step's coda has its own)."""
        offset = len(self._applications(step))
        for index, layer in enumerate(self.config.loop["coda"]):
            hidden = self._apply(layer, 0, self._slot(step, offset + index), hidden, context, cache)
        return hidden

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ the base model's logit soft-capping)."""
        logits = self.get_output_embeddings()(self._module("final_norm")(hidden))
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _run(self, hidden: torch.Tensor, context: dict, cache, exit_rule: str | None, threshold: float | None,
             coda_all: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The loop, stopping early by `exit_rule` (None: never): returns what the head reads, the
        logits of the last position when the rule already computed them, and the steps run.

        Mirrors depthkit's `decode_step`: the earliest exit is after step 2 (two steps to compare),
        and never at the last step, which runs anyway; a "hidden" exit runs the coda in the last
        step's cache slots."""
        steps, previous, logits = self._num_steps(), None, None
        for step, block_output, final in self._steps(hidden, context, cache, coda_all):
            if exit_rule is None:
                continue
            logits = self._head(final[:, -1:]) if exit_rule == "kl" else None
            signal = F.log_softmax(logits[:, -1].float(), dim=-1) if logits is not None else block_output[:, -1]
            if previous is not None and step < steps - 1 and _distance(exit_rule, signal, previous) < threshold:
                if final is None:
                    final = self._coda(steps - 1, block_output, context, cache)
                return final, logits, step + 1
            previous = signal
        return final, logits, steps

    def _reuse_latest_kv(self, cache, exit_step: int, with_coda: bool) -> None:
        """Fill the skipped steps' cache slots of the newest position with its exit step's keys/values
        (the coda's too when every step's coda ran), through the cache's own `update` so every layer
        kind (sliding windows too) keeps its length."""
        source = self._step_slots(exit_step, with_coda)
        for step in range(exit_step + 1, self._num_steps()):
            for src, dst in zip(source, self._step_slots(step, with_coda)):
                layer = cache.layers[src]
                cache.update(layer.keys[:, :, -1:], layer.values[:, :, -1:], dst)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, cache=None,
                exit_threshold: float | None = None, exit_rule: str | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits after all R steps, or after fewer when early exit stops a new token (the module
        docstring); `exit_threshold`/`exit_rule` override the config's for this call. The KV cache comes
        as `cache` (transformers >= 5.24 names it so in `generate`) or `past_key_values` (earlier
        versions), and is returned under the installed name."""
        threshold = self.config.exit_threshold if exit_threshold is None else exit_threshold
        rule = exit_rule or self.config.exit_rule
        if threshold is not None and (rule not in EXIT_RULES or threshold < 0):
            raise ValueError(f"early exit needs a threshold >= 0 and a rule in {EXIT_RULES}, got {threshold}, "
                             f"{rule!r}")
        hidden = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        # Per-token decisions: one sequence with a cache; of it, only a single new token after the prompt
        # may exit (a one-token prompt is a prompt: all R steps, as in depthkit's `generate`).
        one_sequence = threshold is not None and cache is not None and hidden.shape[0] == 1
        may_exit = one_sequence and hidden.shape[1] == 1 and past > 0
        try:
            context = self._context(hidden, attention_mask, cache, position_ids)
            hidden, logits, used = self._run(hidden, context, cache, rule if may_exit else None, threshold,
                                             coda_all=one_sequence and rule == "kl")
        finally:
            for index, layer in enumerate(self._layers()):
                _resolve(layer, self.config.loop["parts"]["attention"]).layer_idx = index
                if hasattr(layer, "layer_idx"):
                    layer.layer_idx = index
        if used < self._num_steps():
            self._reuse_latest_kv(cache, used - 1, with_coda=rule == "kl")
        if not past:  # a new sequence
            self.steps_used = []
        self.steps_used.append(used)
        if logits is None:
            logits = self._head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def _distance(rule: str, current: torch.Tensor, previous: torch.Tensor) -> float:
    """depthkit's exit distances: KL(current || previous) of two steps' log-probabilities ("kl"), or the
    relative change of the block's output ||current - previous|| / ||current|| ("hidden")."""
    if rule == "kl":
        distance = (current.exp() * (current - previous)).sum(-1)
    else:
        current, previous = current.float(), previous.float()
        distance = (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)
    return float(distance.max())
