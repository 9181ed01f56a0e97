"""Inference speed: prefill throughput, time to first token, decode throughput with a KV cache,
and peak memory.

Each measurement runs `warmup` untimed times, then `repeats` timed times; the median is the
figure and min/max the spread, because on a shared CPU single runs vary by tens of percent.
Prompts are seeded random token ids: speed does not depend on the text. Prefill and time to first
token compute the logits of the last position only (`logits_to_keep=1`, as generation does), so
the vocabulary projection of every prompt position is not counted as model work.

Peak memory is the process's peak resident set on CPU (Linux's VmHWM, reset through
/proc/self/clear_refs before the measurement, with `getrusage`'s lifetime peak as the fallback),
and `torch.cuda.max_memory_allocated` on GPU. It includes the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.errors import DepthkitError
from depthkit.evaluate.perplexity import check_context
from depthkit.models.blockwise import cache_keyword


@dataclass
class Spread:
    """Median, min and max of repeated measurements."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def per_second(self, count: float) -> Spread:
        """`count` units over these durations, as a rate (the slowest run gives the min rate)."""
        return Spread(count / self.median, count / self.max, count / self.min)


@dataclass
class SpeedResult:
    device: str
    dtype: str
    threads: int
    repeats: int
    warmup: int
    prefill: list[dict]  # batch_size, seq_len, tokens_per_s {median,min,max}, seconds {median,min,max}
    decode: list[dict]  # batch_size, prompt_len, new_tokens, tokens_per_s, time_to_first_token_s
    peak_memory_mb: float
    memory_kind: str  # "rss" (CPU process peak) or "cuda_allocated"

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[dict]:
        rows = [{"phase": "prefill", "batch": p["batch_size"], "tokens": p["seq_len"],
                 "tokens/s": p["tokens_per_s"]["median"], "min": p["tokens_per_s"]["min"],
                 "max": p["tokens_per_s"]["max"], "ttft_s": ""} for p in self.prefill]
        rows += [{"phase": "decode", "batch": d["batch_size"], "tokens": d["new_tokens"],
                  "tokens/s": d["tokens_per_s"]["median"], "min": d["tokens_per_s"]["min"],
                  "max": d["tokens_per_s"]["max"], "ttft_s": d["time_to_first_token_s"]["median"]}
                 for d in self.decode]
        return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return times


def _last_logits_kwargs(model: PreTrainedModel) -> dict:
    """`logits_to_keep=1` where the model's forward accepts it (all transformers causal LMs do)."""
    accepted = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


def _prompt(model: PreTrainedModel, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def time_decode(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, extra: dict) -> tuple[float, float]:
    """(time to first token, time of `new_tokens` greedy steps on the KV cache), one run."""
    device = ids.device
    _sync(device)
    began = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **extra)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    first = time.perf_counter() - began
    keyword = cache_keyword(type(model).forward)  # the output names the cache as the input does
    cache = getattr(out, keyword)
    began = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{keyword: cache})
        cache, token = getattr(out, keyword), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return first, time.perf_counter() - began


@torch.no_grad()
def measure_speed(
    model: PreTrainedModel,
    batch_sizes: Sequence[int] = (1, 4),
    seq_lens: Sequence[int] = (128, 512),
    decode_batch_sizes: Sequence[int] = (1,),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> SpeedResult:
    """Prefill tokens/s for every (batch size, sequence length), decode tokens/s and time to first token."""
    _check_args(batch_sizes, seq_lens, decode_batch_sizes, prompt_len, new_tokens, repeats, warmup)
    check_context(model, max([*seq_lens, prompt_len + new_tokens]))
    model.eval()
    device = next(model.parameters()).device
    extra = _last_logits_kwargs(model)
    memory = _PeakMemory(device)
    configs = [(b, n) for b in batch_sizes for n in seq_lens]
    bar = tqdm(total=len(configs) + len(decode_batch_sizes), desc="speed", unit="config", disable=not progress)
    prefill = []
    for batch, length in configs:
        ids = _prompt(model, batch, length, seed).to(device)
        seconds = Spread.of(_timed(lambda ids=ids: model(input_ids=ids, **extra), device, repeats, warmup))
        prefill.append({"batch_size": batch, "seq_len": length, "seconds": asdict(seconds),
                        "tokens_per_s": asdict(seconds.per_second(batch * length))})
        bar.update()
    decode = []
    for batch in decode_batch_sizes:
        ids = _prompt(model, batch, prompt_len, seed).to(device)
        for _ in range(warmup):
            time_decode(model, ids, new_tokens, extra)
        firsts, steps = zip(*(time_decode(model, ids, new_tokens, extra) for _ in range(repeats)))
        decode.append({"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "time_to_first_token_s": asdict(Spread.of(firsts)),
                       "tokens_per_s": asdict(Spread.of(steps).per_second(batch * new_tokens))})
        bar.update()
    bar.close()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return SpeedResult(str(device), dtype, torch.get_num_threads(), repeats, warmup, prefill, decode,
                       memory.peak_mb(), memory.kind)


def _check_args(batch_sizes, seq_lens, decode_batch_sizes, prompt_len, new_tokens, repeats, warmup) -> None:
    if not batch_sizes or not seq_lens:
        raise DepthkitError("need at least one batch size and one sequence length")
    if min([*batch_sizes, *seq_lens, *decode_batch_sizes, prompt_len, new_tokens, repeats]) < 1 or warmup < 0:
        raise DepthkitError("batch sizes, lengths, new tokens and repeats must be positive (warm-up >= 0)")


class _PeakMemory:
    """Peak memory from now on: CUDA's allocator peak, or the process's peak RSS on CPU."""

    _STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self._reset_rss_peak()

    @staticmethod
    def _reset_rss_peak() -> None:
        """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the lifetime peak is used."""
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in self._STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
