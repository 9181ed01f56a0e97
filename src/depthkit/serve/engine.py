"""Continuous batching for plain and looped models, with depth-wise batching for early exit.

Every model is served as a `RecursiveModel`: a plain checkpoint is one loop over its whole decoder.
Each running sequence owns a row of the `SlotCache`; each iteration of the engine admits waiting
requests into free rows (their prompt is prefilled at full depth on its own), then advances the
running ones. Two schedules (`SCHEDULES`):

- `lockstep` (plain continuous batching): the rows advance one TOKEN per iteration, all of its
  loop steps in turn; a token that exits early leaves the batch for the remaining steps, so its row
  idles until the slowest token of the iteration is done. New requests join between tokens.
- `depthwise`: the rows advance one loop STEP per iteration. One pass of the shared block serves
  rows at different steps of different tokens (each row's keys go to its own step's cache slot);
  a row whose token is done (its last step, or early exit) samples and starts its next token at
  step 0 in the next pass, and a finished sequence's row is refilled at once. Early exit then
  saves compute instead of idle time (Relaxed Recursive Transformers' continuous depth-wise batching).

The LM head is the one part whose cost hardly depends on how many rows it serves (on SmolLM2 its
49k x 576 matrix is read once per call, as much as ~8 layers), so a done token whose logits decide
nothing (its last step, or a `hidden`-rule exit) does not run it at once: it waits in its row, and
one head call serves every waiting row. The coda (the layers after the loop) waits with it and runs
in the same call, each row in its last step's cache slots, as `generate` runs a `hidden`-rule exit's
coda (`depthkit.recursive.generate`): one coda call per head call, not one per pass. Waiting is not
free either: a waiting row sits out the block passes, each of which costs the same with or without
it. Depth-wise, the head therefore runs by the rent-or-buy rule: once the passes its waiting rows
have sat out cost `head_patience` (default `HEAD_PATIENCE`) times a head call, or when no row is
left computing (lockstep: at the end of every iteration). Both costs are timed as the engine runs (a
pass's wall time times the share of rows that sat it out; a running average of the head's), not
counted in weights: SmolLM2's head reads as many weights as 1.8 passes of a 4-layer loop with its
coda, but on 2 CPU cores in bf16 it took less time than one pass (an ad-hoc timing), as each layer's
attention and small kernels cost more than its weights suggest. When exits cluster on a step or two
this waits for the stragglers, as lockstep does; when they spread, the head runs every few passes.
The `kl` rule needs a row's logits at every step to decide, so those rows run the head at once, and
the waiting rows ride along in the same call.

Early exit follows `depthkit.recursive.generate` exactly (the distance between consecutive steps,
earliest after step 2): a token that exits at step r gives the skipped steps' cache slots a copy of
its step-r keys and values, so later tokens at those steps attend to its last computed state (the
`kl` rule's every-step coda slots included). The per-sequence outputs of both schedules are those of
`generate` one sequence at a time, up to the rounding of batched arithmetic. With per-loop adapters
(a relaxed model) rows at different steps need different weights, so a depth-wise pass runs one
sub-batch per step present.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from depthkit.errors import DepthkitError, require
from depthkit.models.blockwise import BlockContext
from depthkit.recursive.config import check_loops
from depthkit.recursive.generate import (
    DEFAULT_EXIT_RULE,
    check_exit_rule,
    decodes_every_step,
    hidden_change,
    kl_divergence,
)
from depthkit.recursive.model import RecursiveModel
from depthkit.serve.cache import SlotCache, attention_masks, prompt_masks

SCHEDULES = ("depthwise", "lockstep")
DEFAULT_ROWS = 16
DEFAULT_CAPACITY = 2048
# Depth-wise: how many head calls' worth of sat-out block passes the rows waiting for the LM head
# accumulate before it runs (see the module's docstring). 1 is the classic rent-or-buy break-even,
# which, for one wait taken alone, never costs more than twice what the best choice in hindsight
# would. 0 runs the head whenever a token is done.
HEAD_PATIENCE = 1.0
# Weight of the latest call in the running average of the head's wall time (calls vary by a few %).
HEAD_TIME_SMOOTHING = 0.2
log = logging.getLogger(__name__)


class ContextLengthError(DepthkitError):
    """A prompt plus its requested tokens do not fit a row of the cache (OpenAI's `context_length_exceeded`)."""


@dataclass
class GenerationParams:
    """What a request asks for (OpenAI's fields, plus depthkit's loop controls)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    loops: int | None = None  # recursion depth R (None: the model's)
    exit_threshold: float | None = None  # early exit below this distance between steps (None: always R loops)
    exit_rule: str = DEFAULT_EXIT_RULE  # the distance: `depthkit.recursive.generate.EXIT_RULES`


@dataclass
class Event:
    """What the engine reports to a request: a new token, or the end (with why and loop counts)."""

    token: int | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Sequence:
    """A request in the engine: its prompt, what it generated, and where its current token stands."""

    prompt: list[int]
    params: GenerationParams
    emit: Callable[[Event], None] = lambda event: None
    tokens: list[int] = field(default_factory=list)
    steps_used: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: str | None = None
    row: int = -1
    loops: int = 0
    step: int = 0
    pending: int = 0  # the token whose loop steps are being computed
    hidden: torch.Tensor | None = None  # the current step's input (1, 1, hidden)
    origin: torch.Tensor | None = None  # the prelude's output for the pending token
    previous: torch.Tensor | None = None  # the last step's log-probs (`kl` rule) or block output (`hidden`)
    done_output: torch.Tensor | None = None  # a done token's block output, waiting for the batched coda + LM head
    generator: torch.Generator | None = None

    @property
    def position(self) -> int:
        """Absolute position of the pending token (the prompt and every earlier token before it)."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def decides_by_logits(self) -> bool:
        """Whether its tokens may exit by the `kl` rule, which needs every step's coda and logits."""
        return decodes_every_step(self.params.exit_threshold, self.params.exit_rule)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop this sequence (thread-safe: read at the next iteration)."""
        self.cancelled = reason


class Engine:
    """Serves one model to many sequences; `start()` runs it in a background thread."""

    def __init__(self, model: RecursiveModel, eos_token_ids: set[int], rows: int = DEFAULT_ROWS,
                 capacity: int | None = None, schedule: str = "depthwise", max_loops: int | None = None,
                 head_patience: float = HEAD_PATIENCE):
        require(schedule in SCHEDULES, f"unknown schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")
        require(rows >= 1, f"rows must be >= 1, got {rows}")
        require(math.isfinite(head_patience) and head_patience >= 0,
                f"head_patience must be a finite number >= 0, got {head_patience}")
        config = model.config
        self.model, self.schedule, self.eos = model.eval(), schedule, set(eos_token_ids)
        self.max_loops = check_loops(max_loops or config.num_loops)
        require(config.order == "cycle" or schedule == "lockstep",
                "a SEQUENCE-order model has one step per token: serve it with the lockstep schedule")
        context = getattr(model.base.config, "max_position_embeddings", None) or DEFAULT_CAPACITY
        self.capacity = min(capacity or DEFAULT_CAPACITY, context)
        self.cache = SlotCache(model.num_slots(self.max_loops), rows, self.capacity)
        self.per_loop_weights = bool(len(model.adapters.relax) or len(model.adapters.norms))
        self.rows, self.head_patience = rows, head_patience
        self._sat_out = 0.0  # seconds of block passes sat out by rows waiting for the LM head (times their share)
        self._head_seconds: float | None = None  # running average of an LM head call's wall time
        # decode-phase model calls by part (prelude, block, coda, head) and the tokens they made (a prompt's
        # first token comes from its prefill, not counted): what a schedule costs per token, for benchmarks
        # and monitoring (on a CPU a call costs about the same for 1 row as for 8)
        self.calls: Counter[str] = Counter()
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- requests ----------------------------------------------------------------------------
    def check(self, prompt_tokens: int, params: GenerationParams) -> None:
        """Refuse what this engine cannot serve, before it is queued (a clear message per case)."""
        require(prompt_tokens >= 1, "the prompt is empty")
        require(params.max_tokens >= 1, f"max_tokens must be >= 1, got {params.max_tokens}")
        if prompt_tokens + params.max_tokens > self.capacity:
            raise ContextLengthError(f"a {prompt_tokens}-token prompt plus max_tokens={params.max_tokens} exceeds "
                                     f"the context of {self.capacity} tokens")
        loops = params.loops if params.loops is not None else self.model.config.num_loops
        require(isinstance(loops, int) and 1 <= loops <= self.max_loops,
                f"loops must be an integer in 1..{self.max_loops} (the server's maximum), got {loops!r}")
        require(params.exit_threshold is None or params.exit_threshold >= 0,
                f"exit_threshold must be >= 0, got {params.exit_threshold}")
        check_exit_rule(params.exit_rule)
        require(params.temperature >= 0, f"temperature must be >= 0, got {params.temperature}")
        require(0 < params.top_p <= 1, f"top_p must be in (0, 1], got {params.top_p}")

    def submit(self, sequence: Sequence) -> Sequence:
        self.check(len(sequence.prompt), sequence.params)
        with self._lock:
            self.waiting.append(sequence)
        self._wake.set()
        return sequence

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.running)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        """Serve in a background thread (once: a second call while it runs does nothing)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._serve_forever, name="depthkit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _serve_forever(self) -> None:
        while not self._stop:
            if not self.busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.iteration()
            except Exception as err:  # one bad batch must not take the server down
                log.exception("engine iteration failed")
                self._fail_all(f"{type(err).__name__}: {err}")

    def run_until_idle(self) -> None:
        """Serve every submitted sequence to its end in the calling thread (benchmarks, tests)."""
        while self.busy:
            self.iteration()

    @torch.inference_mode()
    def iteration(self) -> None:
        """Admit waiting requests into free rows, then advance the running ones (see `SCHEDULES`)."""
        self._drop_cancelled()
        try:
            if self.schedule == "depthwise":
                self._admit()
                self._run_head(everyone=False)
                computing = [s for s in self.running if s.done_output is None]
                idle_share, start = 1 - len(computing) / max(len(self.running), 1), time.perf_counter()
                self._advance(computing)
                self._sat_out += (time.perf_counter() - start) * idle_share
                return
            self._admit()  # lockstep: every token of the last iteration is done
            batch = list(self.running)
            while batch:
                done = self._advance(batch)
                batch = [s for s in batch if s not in done and s.finish_reason is None]
            self._run_head(everyone=True)
        finally:
            self.model.reset_layer_indices()

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.cancelled]:
            self._finish(sequence, sequence.cancelled)

    def _admit(self) -> None:
        """Free rows take waiting requests; their prompts are prefilled together (per loop setting)."""
        admitted: list[Sequence] = []
        while self.free_rows:
            with self._lock:
                if not self.waiting:
                    break
                sequence = self.waiting.popleft()
            if sequence.cancelled:
                sequence.emit(Event(finish_reason=sequence.cancelled))
                continue
            sequence.row = len(self.running)  # running sequences hold the leading rows, in order
            self.running.append(sequence)
            admitted.append(sequence)
        settings = {(s.params.loops, s.decides_by_logits) for s in admitted}
        for loops, every_coda in sorted(settings, key=str):
            self._prefill([s for s in admitted if (s.params.loops, s.decides_by_logits) == (loops, every_coda)])

    def _fail_all(self, message: str) -> None:
        for sequence in list(self.running):
            self._finish(sequence, "error", message)
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for sequence in waiting:
            sequence.emit(Event(finish_reason="error", error=message))

    # -- model passes ------------------------------------------------------------------------
    def _context(self, hidden: torch.Tensor, positions: torch.Tensor) -> BlockContext:
        """Rotary tables and per-row causal masks for queries at `positions` (rows, queries)."""
        base = self.model.base
        masks = attention_masks(positions, int(positions.max()) + 1, getattr(base.config, "sliding_window", None),
                                self._eager, hidden.dtype)
        tables = self.model.adapter.position_embeddings(base, hidden, positions)
        return BlockContext(positions, tables, masks, self.model.adapter, base.config)

    def _step_offset(self, step: int) -> int:
        return self.model.slot(step, 0, self.max_loops) - self.model.slot(0, 0, self.max_loops)

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Prompts (left-padded to one length) at full depth in their rows, in one pass; every step's
        coda too when they may exit by the `kl` rule (later tokens exiting at that step attend to the
        prompt there)."""
        for sequence in sequences:
            params = sequence.params
            sequence.loops = params.loops if params.loops is not None else self.model.config.num_loops
            sequence.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                               else int(torch.randint(0, 2**62, (1,))))
        length = max(len(s.prompt) for s in sequences)
        pads = [length - len(s.prompt) for s in sequences]
        ids = torch.tensor([[0] * pad + s.prompt for s, pad in zip(sequences, pads)], device=self._device)
        embeddings = self.model.embed(ids)
        pad_tensor = torch.tensor(pads, device=self._device)
        positions = (torch.arange(length, device=self._device).unsqueeze(0) - pad_tensor.unsqueeze(1)).clamp_min(0)
        base = self.model.base
        masks = prompt_masks(positions, pad_tensor, getattr(base.config, "sliding_window", None), self._eager,
                             embeddings.dtype)
        context = BlockContext(positions, self.model.adapter.position_embeddings(base, embeddings, positions), masks,
                               self.model.adapter, base.config)
        self.cache.bind_prompts([s.row for s in sequences], pads)
        *_, last = self.model.iter_steps(inputs_embeds=embeddings, num_loops=sequences[0].loops,
                                         past_key_values=self.cache, decode_all=False, logits_to_keep=1,
                                         context=context, coda_all=sequences[0].decides_by_logits)
        for sequence, token in zip(sequences, next_tokens(sequences, last.logits[:, -1].float())):
            self._emit_token(sequence, token)

    @property
    def _eager(self) -> bool:
        """Eager attention adds its mask (floats); SDPA takes booleans."""
        return getattr(self.model.base.config, "_attn_implementation", "sdpa") == "eager"

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _advance(self, batch: list[Sequence]) -> list[Sequence]:
        """One loop step for every sequence of `batch` (each at its own step); returns the ones whose
        token is complete."""
        batch = list(batch)  # finishing sequences leave `self.running` while we work
        if not batch:
            return []
        starting = [s for s in batch if s.step == 0]
        if starting:
            self._start_tokens(starting)
        groups = [batch]
        if self.per_loop_weights:
            groups = [[s for s in batch if s.step == step] for step in sorted({s.step for s in batch})]
        done = []
        for group in groups:
            done += self._step_group(group)
        return done

    def _start_tokens(self, sequences: list[Sequence]) -> None:
        """Embed each sequence's pending token and run the prelude (the layers before the loop)."""
        ids = torch.tensor([[s.pending] for s in sequences], device=self._device)
        hidden = self.model.embed(ids)
        context = self._bind(sequences, hidden)
        hidden = self.model.run_prelude(hidden, context, self.cache)
        self.calls["prelude"] += bool(self.model.config.prelude)  # a plain model has none to call
        for index, sequence in enumerate(sequences):
            sequence.hidden = sequence.origin = hidden[index: index + 1]
            sequence.previous = None

    def _bind(self, sequences: list[Sequence], hidden: torch.Tensor, steps: list[int] | None = None
              ) -> BlockContext:
        """Bind the cache to these rows (each at the loop step `steps` names, as slot offsets from step 0;
        None: no offsets) and build their context."""
        positions = torch.tensor([[s.position] for s in sequences], device=self._device)
        offsets = [self._step_offset(step) for step in steps] if steps is not None else None
        self.cache.bind([s.row for s in sequences], [s.position for s in sequences], offsets)
        return self._context(hidden, positions)

    def _step_group(self, group: list[Sequence]) -> list[Sequence]:
        """Run the block once over `group`; the rows whose token is done wait for the head, `kl` rows
        decide; the rest move on to their next step."""
        model = self.model
        # Rows at different steps: the layer index names step 0's slot and each row's offset shifts it;
        # a group of one step (per-loop weights) runs that step's own adapters with no offset.
        same_step = len({s.step for s in group}) == 1
        step = group[0].step if same_step else 0
        hidden = torch.cat([s.hidden for s in group])
        context = self._bind(group, hidden, None if same_step else [s.step for s in group])
        output, taps = model.run_step(step, self.max_loops, hidden, context, self.cache)
        self.calls["block"] += 1
        finished = {i for i, s in enumerate(group)
                    if s.step == s.loops - 1 or self._hidden_rule_exits(s, output[i, -1])}
        for i in sorted(finished):
            self._wait_for_head(group[i], output[i: i + 1])
        deciding = [i for i, s in enumerate(group) if i not in finished and s.decides_by_logits]
        if deciding:
            finished |= self._decide(group, deciding, output)
        moving = [i for i in range(len(group)) if i not in finished]
        if moving:
            index = torch.tensor(moving, device=output.device)
            steps_in = torch.cat([group[i].hidden for i in moving])
            origins = torch.cat([group[i].origin for i in moving])
            inputs = model.next_input(output[index], [t[index] for t in taps], origins, steps_in, None)
            for row, i in enumerate(moving):
                group[i].hidden = inputs[row: row + 1]
                group[i].step += 1
        return [group[i] for i in sorted(finished)]

    def _decide(self, group: list[Sequence], indices: list[int], output: torch.Tensor) -> set[int]:
        """The `kl` rule for the rows `indices` of `group` (block outputs `output`): this step's coda and
        logits, compared with the last step's; returns the indices of the rows that exit. The rows
        waiting for the head ride along in the call, which costs about the same with them."""
        rows, waiting = [group[i] for i in indices], self._waiting_for_head()
        deciding = output[torch.tensor(indices, device=output.device)]
        logits = self._head(rows + waiting, torch.cat([deciding, *[s.done_output for s in waiting]]),
                            [s.step for s in rows] + [s.loops - 1 for s in waiting])
        log_probs = F.log_softmax(logits[:len(rows)], dim=-1)
        exiting = []
        for k, sequence in enumerate(rows):
            previous, sequence.previous = sequence.previous, log_probs[k]
            if previous is not None and float(kl_divergence(log_probs[k], previous)) < sequence.params.exit_threshold:
                exiting.append(k)
        for k in exiting:
            self._mark_done(rows[k])
        for k, token in zip(exiting, next_tokens([rows[k] for k in exiting], logits[exiting])):
            self._emit_token(rows[k], token)
        self._serve_waiting(waiting, logits[len(rows):])
        return {indices[k] for k in exiting}

    @staticmethod
    def _hidden_rule_exits(sequence: Sequence, block_output: torch.Tensor) -> bool:
        """Whether a `hidden`-rule row exits at this step (its block output barely moved)."""
        params = sequence.params
        if params.exit_threshold is None or params.exit_rule != "hidden":
            return False
        previous, sequence.previous = sequence.previous, block_output
        return previous is not None and float(hidden_change(block_output, previous)) < params.exit_threshold

    def _mark_done(self, sequence: Sequence) -> None:
        """Record the token's loop count; an early exit fills its skipped steps' cache slots."""
        if sequence.step < sequence.loops - 1:
            self._reuse_latest_kv(sequence, sequence.step, with_coda=sequence.decides_by_logits)
        sequence.steps_used.append(sequence.step + 1)
        self.calls["tokens"] += 1

    def _wait_for_head(self, sequence: Sequence, block_output: torch.Tensor) -> None:
        self._mark_done(sequence)
        sequence.done_output = block_output

    def _waiting_for_head(self) -> list[Sequence]:
        return [s for s in self.running if s.done_output is not None]

    def _run_head(self, everyone: bool) -> None:
        """The LM head once for the rows waiting for it, when it is due (`everyone`, no row left
        computing, or the rent-or-buy rule of the module's docstring): each samples its token and
        starts the next one."""
        waiting = self._waiting_for_head()
        if not waiting:
            return
        timed = self._head_seconds is not None and self._sat_out >= self.head_patience * self._head_seconds
        if everyone or len(waiting) == len(self.running) or timed or self.head_patience == 0:
            hidden = torch.cat([s.done_output for s in waiting])
            self._serve_waiting(waiting, self._head(waiting, hidden, [s.loops - 1 for s in waiting]))

    def _head(self, rows: list[Sequence], hidden: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """One call of the coda (each row in the cache slots of its step in `steps`) and the LM head
        over these rows' block outputs (rows, 1, hidden): their next-token logits (rows, vocab), float.
        Timed for the rent-or-buy rule."""
        start = time.perf_counter()
        if self.model.config.coda:
            hidden = self.model.run_coda(0, self.max_loops, hidden, self._bind(rows, hidden, steps), self.cache)
            self.calls["coda"] += 1
        logits = self.model.decode(hidden, 1)[:, -1].float()
        seconds, previous = time.perf_counter() - start, self._head_seconds
        self._head_seconds = seconds if previous is None else previous + HEAD_TIME_SMOOTHING * (seconds - previous)
        self.calls["head"] += 1
        return logits

    def _serve_waiting(self, waiting: list[Sequence], logits: torch.Tensor) -> None:
        if waiting:
            self._sat_out = 0.0
        for sequence, token in zip(waiting, next_tokens(waiting, logits)):
            sequence.done_output = None
            self._emit_token(sequence, token)

    def _reuse_latest_kv(self, sequence: Sequence, exit_step: int, with_coda: bool) -> None:
        model, loops = self.model, sequence.loops
        sources = model.step_slots(exit_step, loops, with_coda)
        for step in range(exit_step + 1, model.config.num_steps(loops)):
            self.cache.copy_position(sequence.row, sequence.position, sources,
                                     model.step_slots(step, loops, with_coda))

    # -- tokens ------------------------------------------------------------------------------
    def _emit_token(self, sequence: Sequence, token: int) -> None:
        """Report the next token, and end the sequence or queue the token's own pass."""
        sequence.step = 0
        if token in self.eos:
            self._finish(sequence, "stop")
            return
        sequence.tokens.append(token)
        sequence.pending = token
        sequence.emit(Event(token=token))
        if sequence.cancelled:
            self._finish(sequence, sequence.cancelled)
        elif len(sequence.tokens) >= sequence.params.max_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        sequence.finish_reason = reason
        if sequence in self.running:
            last = self.running[-1]
            if last is not sequence:  # the last row fills the freed one: running rows stay 0..n-1
                self.cache.move_row(last.row, sequence.row)
                last.row = sequence.row
            self.running.remove(sequence)
            self.running.sort(key=lambda s: s.row)
        sequence.hidden = sequence.origin = sequence.previous = sequence.done_output = None
        sequence.emit(Event(finish_reason=reason, error=error))


def next_tokens(sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
    """Each row's next token from its logits (rows, vocab): greedy at temperature 0 (one batched max
    for all rows: on 2 CPU cores, eight argmaxes over SmolLM2's vocabulary took about half a layer's
    time, an ad-hoc timing), otherwise sampled."""
    best = logits.max(dim=-1).indices.tolist()
    return [token if s.params.temperature == 0 else sample(row, s.params, s.generator)
            for s, row, token in zip(sequences, logits, best)]


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Nucleus sampling (`top_p`) at `temperature` > 0."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
