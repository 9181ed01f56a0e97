"""How closely a compressed model still behaves like the original, beside its perplexity.

Perplexity says how well a model predicts text; it does not say whether it predicts the SAME
things as the model it came from (a compressed chat model can keep its perplexity and still
stop answering "Paris"). On the same token blocks we measure, per next-token position:

- `top1_agreement`: how often the compressed model's most likely token is the original's;
- `kl`: mean KL(original || compressed) of the next-token distributions, in nats.

The original's log-probabilities are computed once (`reference_logprobs`, float16) and reused for
every compressed model compared against it, unless they would not fit `STORED_REFERENCE_LIMIT`
(Gemma's 262k-token vocabulary makes them 4 GiB per 16 x 512 tokens): then a frozen copy of the
original recomputes them chunk by chunk, rounded the same way, so both paths give the same figures.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

# float16 keeps log-probabilities to ~1e-3 relative over their whole range (bf16: ~1e-2) at half the memory.
REFERENCE_DTYPE = torch.float16
STORED_REFERENCE_LIMIT = 1 << 30  # bytes of stored predictions per text, beyond which they are recomputed
# float32 log-probabilities per forward: SmolLM2's 49k words take 4 sequences of 512 tokens, Gemma's 262k one,
# so that two benchmarks fit side by side (each forward makes several temporaries of this size).
CHUNK_LOGITS_BYTES = 1 << 29


@dataclass
class Behaviour:
    """Perplexity of a model on token blocks and its agreement with a reference (original) model."""

    perplexity: float
    top1_agreement: float
    kl: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def _log_probs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at every position but the last, (n, len - 1, vocab) float32."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[:, :-1].float().cpu()
    return F.log_softmax(logits, dim=-1)


@dataclass
class Predictions:
    """A model's next-token log-probabilities (float16) and its top-1 tokens, taken in float32
    before rounding so that near-ties cannot flip: the reference agrees with itself exactly."""

    logprobs: torch.Tensor
    top1: torch.Tensor


def _predictions(log_probs: torch.Tensor) -> Predictions:
    return Predictions(log_probs.to(REFERENCE_DTYPE), log_probs.argmax(-1))


class Reference:
    """The reference model's predictions on token blocks, chunk by chunk: stored, or recomputed from
    a frozen copy of the model when storing them would exceed `STORED_REFERENCE_LIMIT`."""

    def __init__(self, model: PreTrainedModel, blocks: torch.Tensor, batch_size: int | None = None,
                 frozen: PreTrainedModel | None = None) -> None:
        """`batch_size`: sequences per forward (default: as many as `CHUNK_LOGITS_BYTES` allows, at most 4);
        `frozen`: a copy of `model` that nobody changes, to share between the references of
        several texts (else one is made here when the predictions are too large to store)."""
        per_sequence = (blocks.shape[1] - 1) * model.config.vocab_size * 4
        self.batch_size = batch_size or max(1, min(4, CHUNK_LOGITS_BYTES // per_sequence))
        self.model = None
        if _stored_size(model, blocks) > STORED_REFERENCE_LIMIT:
            self.model = frozen if frozen is not None else copy.deepcopy(model).eval()
        self.stored = None if self.model is not None else [
            _predictions(_log_probs(model, chunk)) for chunk in blocks.split(self.batch_size)]

    def predictions(self, index: int, chunk: torch.Tensor) -> Predictions:
        """The predictions on `chunk`, the `index`-th chunk of the blocks."""
        return self.stored[index] if self.stored is not None else _predictions(_log_probs(self.model, chunk))


def reference_logprobs(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int | None = None,
                       frozen: PreTrainedModel | None = None) -> Reference:
    """The reference model's next-token predictions on `blocks` (n x len)."""
    return Reference(model, blocks, batch_size, frozen)


def _agreement(log_q: torch.Tensor, ref: Predictions) -> tuple[torch.Tensor, float]:
    """(per-position top-1 hits, summed KL(reference || model)) of `log_q` against `ref`, one
    sequence at a time: with Gemma's 262k-word vocabulary every full-size float temporary of a
    4 x 512 chunk is 2 GB, and a benchmark beside another was killed for memory."""
    kl = 0.0
    for log_p, log_q_row in zip(ref.logprobs, log_q):
        log_p = log_p.float()
        kl += float((log_p.exp() * (log_p - log_q_row)).sum())
    return log_q.argmax(-1) == ref.top1, kl


@torch.no_grad()
def compare_behaviour(model: PreTrainedModel, blocks: torch.Tensor, reference: Reference) -> Behaviour:
    """Perplexity of `model` on `blocks` and its agreement with `reference` (`reference_logprobs`)."""
    nll = kl = agree = 0.0
    count = 0
    for index, chunk in enumerate(blocks.split(reference.batch_size)):
        ref = reference.predictions(index, chunk)
        log_q = _log_probs(model, chunk)
        labels = chunk[:, 1:]
        nll += float(-log_q.gather(-1, labels.unsqueeze(-1)).sum())
        hits, divergence = _agreement(log_q, ref)
        kl += divergence
        agree += float(hits.sum())
        count += labels.numel()
    return Behaviour(perplexity=math.exp(nll / count), top1_agreement=agree / count, kl=kl / count, tokens=count)


@dataclass
class ChatReference:
    """One chat prompt with the reference model's greedy answer and its log-probabilities there."""

    prompt: str
    ids: torch.Tensor  # (1, prompt + answer tokens)
    answer_start: int
    predictions: Predictions  # at the answer's positions
    answer: str


def chat_prompts() -> list[str]:
    """depthkit's chat prompts (facts, instructions, code, writing): `chat_prompts.json`."""
    import json
    from importlib import resources

    return json.loads(resources.files(__package__).joinpath("chat_prompts.json").read_text())["prompts"]


@torch.no_grad()
def greedy_chat_answer(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """`model`'s greedy answer to `prompt` as one user turn of its chat template (plain text without
    one): the prompt and answer tokens (1, n) on the CPU, and where the answer starts."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(prompt_ids.to(next(model.parameters()).device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out.cpu(), prompt_ids.shape[1]


@torch.no_grad()
def chat_reference(
    model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int = 32
) -> list[ChatReference]:
    """The reference model's greedy answers to `prompts` in its chat template (plain text without one)."""
    references = []
    for prompt in prompts:
        out, start = greedy_chat_answer(model, tokenizer, prompt, max_new_tokens)
        predictions = _predictions(_log_probs(model, out)[0, start - 1 :])
        references.append(ChatReference(prompt, out, start, predictions,
                                        tokenizer.decode(out[0, start:], skip_special_tokens=True)))
    return references


@torch.no_grad()
def compare_chat(model: PreTrainedModel, references: list[ChatReference]) -> dict[str, float]:
    """On the reference's own answers (teacher-forced): how often `model`'s top-1 token is the
    reference's, KL(reference || model) there, and the share of answers where `model` agrees at
    every token (it would give the same greedy answer)."""
    agree = kl = 0.0
    tokens = same = 0
    for ref in references:
        log_q = _log_probs(model, ref.ids)[0, ref.answer_start - 1 :]
        # Against the reference's own teacher-forced choices (not the generated tokens, which a KV-cached
        # decode can tip the other way on near-ties), so the reference agrees with itself exactly.
        hits, divergence = _agreement(log_q, ref.predictions)
        agree += float(hits.sum())
        kl += divergence
        tokens += hits.numel()
        same += bool(hits.all())
    return {"answer_top1_agreement": agree / tokens, "answer_kl": kl / tokens, "same_answer": same / len(references)}


class BehaviourSuite:
    """The original's predictions on blocks of several domains (and, optionally, its answers to
    depthkit's chat prompts): what `measure` compares every other model against.

    Predictions too large to store are recomputed from one frozen copy of the original, shared by
    every domain (and with other suites through `frozen`).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, domains: list[str], split: str = "heldout",
                 blocks: int = 8, block_len: int = 256, chat: bool = True,
                 frozen: PreTrainedModel | None = None) -> None:
        from depthkit.data.blocks import DataSpec, sample_blocks

        self.texts = {d: sample_blocks(tokenizer, DataSpec(d, split), blocks, block_len) for d in domains}
        too_large = any(_stored_size(model, ids) > STORED_REFERENCE_LIMIT for ids in self.texts.values())
        self.frozen = frozen if frozen is not None or not too_large else copy.deepcopy(model).eval()
        self.references = {d: reference_logprobs(model, ids, frozen=self.frozen) for d, ids in self.texts.items()}
        self.chat = chat_reference(model, tokenizer, chat_prompts()) if chat else []

    def measure(self, model: PreTrainedModel, domains: list[str] | None = None) -> dict:
        """Per domain: perplexity, top-1 agreement and KL against the original; their means; chat agreement."""
        per_domain = {d: compare_behaviour(model, self.texts[d], self.references[d]).to_dict()
                      for d in (domains if domains is not None else self.texts)}
        result: dict = {"domains": per_domain}
        if per_domain:
            result["mean_top1_agreement"] = sum(b["top1_agreement"] for b in per_domain.values()) / len(per_domain)
            result["mean_kl"] = sum(b["kl"] for b in per_domain.values()) / len(per_domain)
        if self.chat:
            result["chat"] = compare_chat(model, self.chat)
        return result


def _stored_size(model: PreTrainedModel, blocks: torch.Tensor) -> int:
    return blocks.shape[0] * (blocks.shape[1] - 1) * model.config.vocab_size * REFERENCE_DTYPE.itemsize
