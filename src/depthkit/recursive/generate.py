"""Generation at any depth R with a KV cache per recursion step, and per-token early exit.

Each application of a layer has its own slot in one `DynamicCache` (see `RecursiveModel.slot`),
so step r of a new token attends to step r's keys and values of every earlier token.

Early exit: after each step r >= 2 of a new token, a distance between steps r and r-1 is
measured; below `threshold` the token stops and is predicted from step r. Two rules (`EXIT_RULES`):
- `kl` (Huginn): the KL divergence between the two steps' next-token distributions. It needs the LM
  head at EVERY step, which on a small model costs more than the loops it saves (SmolLM2's tied
  49k x 576 head is about 8 of its layers).
- `hidden`: the relative change of the block's output, ||h_r - h_{r-1}|| / ||h_r||, per token. It
  needs no head until the token exits, so the steps it saves are saved compute.
Its cache slots of the skipped steps r+1..R are filled with a copy of its latest (step r) keys and
values, so later tokens at those steps still find an entry for it: the "reuse the latest cached KV"
scheme. The coda (the layers after the loop) differs by rule:
- `kl`: every step's coda runs (the rule decodes every step), each in its own step's cache slots,
  and the skipped steps' coda slots reuse step r's too.
- `hidden`: the coda runs once per token, when it exits, in the LAST step's cache slots, as it does
  at fixed depth: the coda attends to every earlier token's final state, whatever step that token
  stopped at. Running every step's coda instead (each step's own slots) made the same predictions
  within 0.1% of perplexity on SmolLM2 r8mix (an ad-hoc check, every domain, thresholds 0.1-0.3)
  and costs one coda per step, which on a 4-layer loop with a 1-layer coda is a fifth more work.
Because it compares two steps, the earliest exit is after step 2. Exit decisions are per token, so
early-exit decoding here runs one sequence at a time (`depthkit serve` batches them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from depthkit.errors import require
from depthkit.models.blockwise import block_context
from depthkit.recursive.config import check_loops
from depthkit.recursive.model import RecursiveModel

DEFAULT_THRESHOLD = 5e-4
EXIT_RULES = ("kl", "hidden")
DEFAULT_EXIT_RULE = "kl"


@dataclass
class DecodeStep:
    """Log-probabilities of the next token and how many steps (loops) produced them."""

    log_probs: torch.Tensor
    steps_used: int


@dataclass
class LoopsReport:
    """Loops actually run per token vs the budget R (for generation and early-exit scoring)."""

    steps_used: list[int] = field(default_factory=list)
    max_steps: int = 1

    @property
    def saved_fraction(self) -> float:
        if not self.steps_used:
            return 0.0
        return 1.0 - sum(self.steps_used) / (len(self.steps_used) * self.max_steps)

    def step_counts(self) -> list[int]:
        """How many tokens stopped at each step 1..max_steps (whether early exit spreads them)."""
        return [self.steps_used.count(step) for step in range(1, self.max_steps + 1)]

    def to_dict(self) -> dict:
        return {"tokens": len(self.steps_used), "max_steps": self.max_steps,
                "mean_steps": sum(self.steps_used) / max(1, len(self.steps_used)),
                "loops_saved": self.saved_fraction}


@dataclass
class GenerationResult:
    input_ids: torch.Tensor
    new_tokens: list[int]
    loops: LoopsReport


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def hidden_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||current - previous|| / ||current|| over the last dimension (the `hidden` exit rule's distance)."""
    current, previous = current.float(), previous.float()
    return (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)


def decodes_every_step(threshold: float | None, rule: str) -> bool:
    """Whether early exit by `rule` runs every step's coda and LM head: `kl` compares the steps' logits,
    `hidden` needs neither until the token exits (the module's docstring)."""
    return threshold is not None and rule == "kl"


def check_exit_rule(rule: str) -> str:
    require(rule in EXIT_RULES, f"unknown exit rule '{rule}'; choose from {', '.join(EXIT_RULES)}")
    return rule


@torch.no_grad()
def decode_step(model: RecursiveModel, input_ids: torch.Tensor, loops: int, cache: DynamicCache,
                threshold: float | None = None, every_step: bool = False, rule: str = DEFAULT_EXIT_RULE) -> DecodeStep:
    """Run new tokens through the recursion with the cache; exit early (one token only) if asked.

    Without a threshold every step runs and only the last is decoded. With one, the loop stops at
    the first step r >= 2 whose `rule` distance to step r-1 is below `threshold` (the `kl` rule
    decodes every step to measure it, each step's coda included; the `hidden` rule runs the coda
    once, in the last step's slots: the module's docstring); the skipped steps' cache slots reuse
    step r's keys and values. `every_step` runs every step's coda without exiting: a prompt
    prefilled for `kl` early-exit decoding must give each step's coda slot the prompt's keys and
    values, or later tokens that exit at that step would attend to themselves alone.
    """
    early = threshold is not None
    kl = check_exit_rule(rule) == "kl"
    every_coda = decodes_every_step(threshold, rule)
    steps = model.config.num_steps(loops)
    embeddings = model.embed(input_ids)
    context = block_context(model.base, embeddings, cache)
    previous, used, out = None, steps, None
    for out in model.iter_steps(inputs_embeds=embeddings, num_loops=loops, past_key_values=cache,
                                decode_all=every_coda, coda_all=every_coda or every_step, logits_to_keep=1,
                                context=context):
        if not early:
            continue
        signal = F.log_softmax(out.logits[:, -1].float(), dim=-1) if kl else out.hidden[:, -1]
        if previous is not None and out.step < steps - 1:
            distance = kl_divergence(signal, previous) if kl else hidden_change(signal, previous)
            if float(distance.max()) < threshold:
                used = out.step + 1
                break
        previous = signal
    final = out.final
    if used < steps:
        if not every_coda:
            final = model.final_coda(loops, out.hidden, context, cache)
        reuse_latest_kv(model, cache, used - 1, loops, with_coda=every_coda)
    logits = out.logits if out.logits is not None else model.decode(final, 1)
    return DecodeStep(F.log_softmax(logits[:, -1].float(), dim=-1), used)


def reuse_latest_kv(model: RecursiveModel, cache: DynamicCache, exit_step: int, loops: int, with_coda: bool
                    ) -> None:
    """Fill the skipped steps' cache slots of the newest position with its exit step's keys/values
    (the block's, and the coda's when every step's coda ran)."""
    source = model.step_slots(exit_step, loops, with_coda)
    for step in range(exit_step + 1, model.config.num_steps(loops)):
        for src, dst in zip(source, model.step_slots(step, loops, with_coda)):
            layer = cache.layers[src]
            cache.update(layer.keys[:, :, -1:], layer.values[:, :, -1:], dst)


@torch.no_grad()
def generate(model: RecursiveModel, input_ids: torch.Tensor, max_new_tokens: int = 32, num_loops: int | None = None,
             exit_threshold: float | None = None, eos_token_id: int | None = None, use_cache: bool = True,
             progress: bool = False, exit_rule: str = DEFAULT_EXIT_RULE) -> GenerationResult:
    """Greedy decoding at `num_loops` loops; cached (default) or by re-running the whole prefix."""
    loops = check_loops(model.config.num_loops if num_loops is None else num_loops)
    require(input_ids.dim() == 2 and input_ids.shape[1] >= 1, "input_ids must have shape (batch, length >= 1)")
    require(exit_threshold is None or input_ids.shape[0] == 1, "early exit decides per token: pass one prompt")
    require(exit_threshold is None or exit_threshold >= 0, f"exit threshold must be >= 0, got {exit_threshold}")
    require(exit_threshold is None or use_cache, "early exit reuses cached keys/values: it needs the KV cache")
    require(max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = getattr(model.base.config, "max_position_embeddings", None)
    require(context is None or input_ids.shape[1] + max_new_tokens <= context,
            f"a {input_ids.shape[1]}-token prompt plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{context} tokens; shorten the prompt or lower `max_new_tokens`")
    model.eval()
    report = LoopsReport(max_steps=model.config.num_steps(loops))
    ids, new_tokens = input_ids, []
    cache = DynamicCache() if use_cache else None
    pending = input_ids
    for index in tqdm(range(max_new_tokens), desc="generate", unit="token", disable=not progress):
        if cache is None:
            log_probs = F.log_softmax(model(ids, loops, logits_to_keep=1).logits[:, -1].float(), -1)
        elif index == 0:  # the prompt is prefilled at full depth
            every_step = decodes_every_step(exit_threshold, exit_rule)
            log_probs = decode_step(model, pending, loops, cache, every_step=every_step).log_probs
        else:  # each new token may exit early
            result = decode_step(model, pending, loops, cache, exit_threshold, rule=exit_rule)
            report.steps_used.append(result.steps_used)
            log_probs = result.log_probs
        pending = log_probs.argmax(-1, keepdim=True)
        ids = torch.cat([ids, pending], dim=1)
        new_tokens.append(int(pending[0]))
        if eos_token_id is not None and input_ids.shape[0] == 1 and new_tokens[-1] == eos_token_id:
            break
    return GenerationResult(ids, new_tokens, report)


@torch.no_grad()
def early_exit_nll(model: RecursiveModel, stream: torch.Tensor, loops: int, threshold: float | None,
                   window: int = 256, max_windows: int = 2, progress: bool = True,
                   rule: str = DEFAULT_EXIT_RULE) -> tuple[float, LoopsReport]:
    """Teacher-forced mean NLL when every token may exit early (decoded token by token with the cache).

    This is the exact inference scheme (KV reuse for skipped steps included), not an estimate
    from a full-depth pass. `threshold=None` runs every step (the reference at depth R).
    """
    report = LoopsReport(max_steps=model.config.num_steps(loops))
    total, count = 0.0, 0
    windows = [stream[i: i + window] for i in range(0, stream.numel() - window + 1, window)][:max_windows]
    require(len(windows) > 0, f"text too short for one window of {window} tokens")
    bar = tqdm(total=sum(w.numel() - 1 for w in windows), desc=f"early exit (thr={threshold})", disable=not progress)
    device = next(model.parameters()).device
    for chunk in windows:
        cache = DynamicCache()
        chunk = chunk.to(device)
        for t in range(chunk.numel() - 1):
            step = decode_step(model, chunk[t: t + 1].view(1, 1), loops, cache, threshold, rule=rule)
            total -= float(step.log_probs[0, chunk[t + 1]])
            count += 1
            report.steps_used.append(step.steps_used)
            bar.update(1)
    bar.close()
    return total / count, report
