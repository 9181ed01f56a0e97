"""Behaviour retention: agreement with the original model, on text and on chat answers."""

import copy

import torch

from depthkit.compress.common import remove_blocks
from depthkit.evaluate import behaviour
from depthkit.evaluate.behaviour import (
    chat_prompts,
    chat_reference,
    compare_behaviour,
    compare_chat,
    reference_logprobs,
)
from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import tiny_model
from tests.conftest import random_ids


def test_a_model_agrees_with_itself_and_a_cut_one_does_not():
    model = tiny_model("llama", num_layers=4)
    blocks = random_ids(model, batch=3, length=16)
    reference = reference_logprobs(model, blocks, batch_size=2)
    same = compare_behaviour(model, blocks, reference)
    assert same.top1_agreement == 1.0 and abs(same.kl) < 1e-3 and same.tokens == 3 * 15
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert abs(same.perplexity - float(nll.exp())) < 1e-3 * same.perplexity
    cut = copy.deepcopy(model)
    remove_blocks(cut, [1, 2])
    other = compare_behaviour(cut, blocks, reference)
    assert other.top1_agreement < 1.0 and other.kl > 1e-3


def test_the_chunk_size_follows_the_vocabulary_and_not_the_figures(monkeypatch):
    model = tiny_model("llama", num_layers=2)
    blocks = random_ids(model, batch=4, length=16)
    default = reference_logprobs(model, blocks)
    monkeypatch.setattr(behaviour, "CHUNK_LOGITS_BYTES", 2 * 15 * model.config.vocab_size * 4)
    pairs = reference_logprobs(model, blocks)
    assert (default.batch_size, pairs.batch_size) == (4, 2)
    cut = copy.deepcopy(model)
    remove_blocks(cut, [1])
    by_four, by_two = compare_behaviour(cut, blocks, default), compare_behaviour(cut, blocks, pairs)
    assert abs(by_four.perplexity - by_two.perplexity) < 1e-4 * by_four.perplexity
    assert abs(by_four.kl - by_two.kl) < 1e-4 and by_four.top1_agreement == by_two.top1_agreement


def test_chat_answers_are_the_originals_own_choices():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", num_layers=3, vocab_size=len(tokenizer))
    references = chat_reference(model, tokenizer, chat_prompts()[:2], max_new_tokens=4)
    assert all(len(ref.predictions.top1) == ref.ids.shape[1] - ref.answer_start for ref in references)
    assert "<|im_start|>" in tokenizer.decode(references[0].ids[0, : references[0].answer_start])
    assert compare_chat(model, references)["same_answer"] == 1.0
    cut = copy.deepcopy(model)
    remove_blocks(cut, [0, 1])
    assert compare_chat(cut, references)["answer_kl"] > 1e-3


def test_recomputed_reference_gives_the_stored_figures(monkeypatch):
    """Predictions too large to store (Gemma's 262k vocabulary) are recomputed from a frozen copy of
    the original: the same figures, even after the caller's model has been compressed in place."""
    import depthkit.evaluate.behaviour as behaviour

    model = tiny_model("llama", num_layers=4)
    blocks = random_ids(model, batch=3, length=16)
    cut = copy.deepcopy(model)
    remove_blocks(cut, [1])
    stored = compare_behaviour(cut, blocks, reference_logprobs(model, blocks, batch_size=2))
    monkeypatch.setattr(behaviour, "STORED_REFERENCE_LIMIT", 0)
    recomputed_reference = reference_logprobs(model, blocks, batch_size=2)
    assert recomputed_reference.stored is None
    remove_blocks(model, [0])  # the reference keeps its own copy
    assert compare_behaviour(cut, blocks, recomputed_reference) == stored
