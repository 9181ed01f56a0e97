"""Attention-only drop (He et al., 2024, "What Matters in Transformers? Not All Attention is Needed").

Importance of the attention sublayer of block l: 1 - mean over tokens of cos(X, X + Attn(N(X))),
its residual-stream input against its output, measured once on calibration tokens. The sublayers
with the lowest importance (highest similarity) are dropped in one shot; MLPs are all kept.

Design choices, recorded on the compression card:
- Budget. As in LLM-Drop's comparisons, `--ratio`/`--target-layers` count attention sublayers one
  for one: removing k blocks' worth drops k attention sublayers (`attention_per_block`, default 1;
  the old 2 per block is `attention_per_block=2`). Parameters are not matched: an attention
  sublayer of SmolLM2-135M holds 0.55M of a block's 3.2M parameters.
- Checkpoint. A plain LLaMA/Qwen/Mistral config cannot express a block without attention, so a
  dropped sublayer is stored with ALL-ZERO q/k/v/o weights (and biases): its output is exactly
  zero, the model computes what the method intends, and it reloads in plain transformers, where
  the zeroed attention is still computed (same depth, size and speed). depthkit's runtime
  (`depthkit eval`, the benchmarks: `models/skipping.py`) skips those sublayers entirely, with no
  KV cache for them, as LLM-Drop's own modeling code does: that is the speed reported.

With `--offload disk` the scores come from one pass over the checkpoint's files, one block in
memory at a time (the same code reads the model through a `BlockSource`), and every block is then
written to the new checkpoint, its attention zeroed where chosen.

Plan: every attention sublayer ranked by its importance, lowest first (`reuse` "ranking"). The
scores are measured once on the original model, whatever the budget, so the first
round(attention_per_block x k) of the ranking are exactly what a search for k blocks drops: one
plan serves every ratio, and other values of `attention_per_block` (an option of apply alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import token_cosine
from depthkit.compress.base import CompressionMethod, CompressionOutcome, MethodOptions, option, register_method
from depthkit.compress.common import ranked_blocks, ranking_steps, scores_by_block
from depthkit.compress.plan import CompressionPlan
from depthkit.errors import require
from depthkit.models.adapters import ATTENTION_PROJECTIONS, ArchitectureAdapter, get_adapter
from depthkit.models.runner import BlockRunner, BlockSink, BlockSource, as_source

NO_SPEEDUP_WARNING = (
    "attention sublayers are zeroed, not removed: in plain transformers the checkpoint keeps its depth, size "
    "and speed (a plain config cannot express a block without attention); depthkit's runtime (`depthkit eval`) "
    "skips them"
)


@torch.no_grad()
def attention_importance(
    model: PreTrainedModel | BlockSource, calib_ids: torch.Tensor, batch_size: int = 8
) -> list[float]:
    """1 - cos(attention sublayer input, its residual output) for every block, in one pass (a
    checkpoint streamed from disk holds one block's weights at a time)."""
    source = as_source(model)
    layers = source.layers()
    hidden = source.embed(calib_ids)
    runner = BlockRunner(source.model, hidden, batch_size)
    scores = []
    for index in tqdm(range(len(layers)), desc="attn_drop", leave=False):
        output, residual = _run_with_attention_residual(runner, layers[index], hidden)
        scores.append(float(1 - token_cosine(hidden, residual).mean()))
        hidden = output
    return scores


def _run_with_attention_residual(
    runner: BlockRunner, layer: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and its residual stream after attention, X + Attn(N(X)).

    The residual is what enters the MLP's norm, caught by a hook on `layer` itself: a
    streamed block is a fresh module per read, so hooks on the model's own blocks would miss it.
    """
    captured: list[torch.Tensor] = []
    norm = runner.adapter.block(layer).mlp_norm
    hook = norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        output = runner.block(layer, hidden)
    finally:
        hook.remove()
    return output, torch.cat(captured)


@torch.no_grad()
def zero_attention(adapter: ArchitectureAdapter, layer: nn.Module) -> nn.Module:
    """Make `layer`'s attention output exactly zero (weights and biases of its four projections); returns it."""
    parts = adapter.block(layer)
    for proj in (parts.role(role) for role in ATTENTION_PROJECTIONS):
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    return layer


@dataclass
class AttentionDropOptions(MethodOptions):
    attention_per_block: float = option(1.0, "attention sublayers dropped per requested block (default 1: one for "
                                             "one, as LLM-Drop compares; 2 was depthkit's old budget)")

    def validate(self) -> None:
        super().validate()
        require(self.attention_per_block > 0, f"attention_per_block must be > 0, got {self.attention_per_block}")


@register_method("attn_drop")
class AttentionDrop(CompressionMethod):
    description = "drop the attention sublayers closest to identity (zeroed in the checkpoint, skipped by depthkit)"
    options_class = AttentionDropOptions
    paper = ("He et al., 2024, What Matters in Transformers? Not All Attention is Needed (LLM-Drop, "
             "attention drop)")
    apply_options = frozenset({"attention_per_block"})
    step_keys = ("block", "score")

    def deviations(self) -> list[str]:
        found = [
            "calibration: the authors' scripts use 256 sequences of 2048 tokens of C4 validation; here the "
            "calibration on the card",
            "the checkpoint stores dropped sublayers as zeros (the authors ship modeling code that removes them); "
            "depthkit's runtime skips them, plain transformers computes them",
            "on post-norm blocks (Gemma) the similarity is taken after the attention post-norm (what joins the "
            "residual stream); the authors' hook reads the attention module's output",
        ]
        if self.settings.attention_per_block != 1:
            found.append(f"{self.settings.attention_per_block} attention sublayers per requested block, not one "
                         "for one")
        return found

    def check_depth(self, num_layers: int, num_remove: int) -> None:
        self.drop_count(num_layers, num_remove)

    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        """Every attention sublayer scored in one pass and ranked, lowest importance first."""
        self.drop_count(len(source.layers()), num_remove)  # a budget that drops none or all: before the pass
        scores = attention_importance(source, calib_ids, self.settings.batch_size)
        return self.new_plan(source, num_remove, "ranking", ranking_steps(scores))

    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """Every block written, its attention zeroed if it is among the first of the ranking."""
        plan.check_count(num_remove)
        adapter = get_adapter(source.model)
        layers = source.layers()
        dropped = ranked_blocks(plan, self.drop_count(len(layers), num_remove))
        for index in range(len(layers)):
            layer = layers[index]
            if index in dropped:
                zero_attention(adapter, layer)
            sink.write_layer(index, layer)
        return CompressionOutcome({
            "dropped_attention": dropped,
            "attention_per_block": self.settings.attention_per_block,
            "attention_importance": scores_by_block(plan),
            "warning": NO_SPEEDUP_WARNING,
        })

    def drop_count(self, depth: int, num_remove: int) -> int:
        """Attention sublayers dropped for `num_remove` blocks' worth: at least one, never all."""
        per_block = self.settings.attention_per_block
        count = round(per_block * num_remove)
        require(1 <= count < depth, f"attn_drop would drop {count} of {depth} attention sublayers "
                                    f"({per_block} per block x {num_remove}); lower attention_per_block or the ratio")
        return count
