"""How closely a compressed model still behaves like the original, beside its perplexity.

Perplexity says how well a model predicts text; it does not say whether it predicts the SAME
things as the model it came from (a compressed chat model can keep its perplexity and still
stop answering "Paris"). On the same token blocks we measure, per next-token position:

- `top1_agreement`: how often the compressed model's most likely token is the original's;
- `kl`: mean KL(original || compressed) of the next-token distributions, in nats.

The original's log-probabilities are computed once (`reference_logprobs`, float16, one tensor per
text) and reused for every compressed model compared against it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

# float16 keeps log-probabilities to ~1e-3 relative over their whole range (bf16: ~1e-2) at half the memory.
REFERENCE_DTYPE = torch.float16


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
class Reference:
    """The reference model's next-token log-probabilities (float16) and its top-1 tokens, taken in
    float32 before rounding so that near-ties cannot flip: the reference agrees with itself exactly."""

    logprobs: torch.Tensor
    top1: torch.Tensor

    def split(self, size: int) -> list[Reference]:
        return [Reference(p, t) for p, t in zip(self.logprobs.split(size), self.top1.split(size))]


def _reference(log_probs: torch.Tensor) -> Reference:
    return Reference(log_probs.to(REFERENCE_DTYPE), log_probs.argmax(-1))


@torch.no_grad()
def reference_logprobs(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 4) -> Reference:
    """The reference model's next-token predictions on `blocks` (n x len)."""
    parts = [_reference(_log_probs(model, chunk)) for chunk in blocks.split(batch_size)]
    return Reference(torch.cat([p.logprobs for p in parts]), torch.cat([p.top1 for p in parts]))


def _agreement(log_q: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, float]:
    """(per-position top-1 hits, summed KL(reference || model)) of `log_q` against `ref`."""
    log_p = ref.logprobs.float()
    return log_q.argmax(-1) == ref.top1, float((log_p.exp() * (log_p - log_q)).sum())


@torch.no_grad()
def compare_behaviour(
    model: PreTrainedModel, blocks: torch.Tensor, reference: Reference, batch_size: int = 4
) -> Behaviour:
    """Perplexity of `model` on `blocks` and its agreement with `reference` (`reference_logprobs`)."""
    nll = kl = agree = 0.0
    count = 0
    for chunk, ref in zip(blocks.split(batch_size), reference.split(batch_size)):
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
    predictions: Reference  # at the answer's positions
    answer: str


def chat_prompts() -> list[str]:
    """depthkit's chat prompts (facts, instructions, code, writing): `chat_prompts.json`."""
    import json
    from importlib import resources

    return json.loads(resources.files(__package__).joinpath("chat_prompts.json").read_text())["prompts"]


@torch.no_grad()
def chat_reference(
    model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int = 32
) -> list[ChatReference]:
    """The reference model's greedy answers to `prompts` in its chat template (plain text without one)."""
    device = next(model.parameters()).device
    references = []
    for prompt in prompts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt
        prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(prompt_ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id).cpu()
        start = prompt_ids.shape[1]
        predictions = _reference(_log_probs(model, out)[0, start - 1 :])
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
