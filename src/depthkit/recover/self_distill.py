"""Self-distillation for chat behaviour: the teacher (the original model) answers chat-formatted
prompts built from the training text, and the student learns its answers' distributions.

No chat data ships offline, yet a compressed chat model should keep answering as the original did
(`depthkit.evaluate.behaviour` measures that on its own evaluation prompts, which are never trained
on). So the teacher writes the chat data itself: `INSTRUCTIONS` (summarise, continue, explain, ...)
over passages cut from the training blocks, in the tokenizer's chat template, answered greedily
(deterministic, and the answer the evaluation compares). Every `self_distill_every`-th optimizer
step trains on a batch of these instead of a text batch, so a run's step count and cost stay what
they were; the loss there is KL(teacher || student) on the answer tokens only (see `answer_kl`).

The set is generated once per run, before training, and saved in the run's checkpoint folder, so a
resumed run trains on exactly the same examples (regenerating would give the same greedy answers on
one machine, but not necessarily on another device).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from depthkit.evaluate.behaviour import greedy_chat_answer
from depthkit.recover.losses import distillation_loss
from depthkit.training import cycled

SET_FILE = "self_distill.pt"
PASSAGE_TOKENS = 96  # long enough to say something about, short enough to leave the answer most of the compute
# Tasks over a passage of the training text. Every prompt quotes training text, so none can be one
# of the evaluation's chat prompts (facts, code questions, letters: `evaluate/chat_prompts.json`).
INSTRUCTIONS = (
    "Summarise this passage in one or two sentences:\n\n{passage}",
    "Continue this text for a few more sentences:\n\n{passage}",
    "Explain what this passage is about:\n\n{passage}",
    "What is the main point of the following text?\n\n{passage}",
    "Rewrite this passage in simpler words:\n\n{passage}",
    "Give this passage a short title:\n\n{passage}",
)


@dataclass
class SelfDistillSet:
    """Prompt + answer token sequences, right-padded to one length, and where the answers are."""

    ids: torch.Tensor  # (n, length); padding (0) only after an example's last token
    targets: torch.Tensor  # (n, length) bool: positions whose NEXT token is an answer token
    prompts: list[str]
    answers: list[str]

    def loader(self, batch_size: int) -> DataLoader:
        """Batches of (ids, targets) in generation order (the prompts are drawn at random already).
        Right padding needs no attention mask: causal attention never lets a real token see it."""
        return DataLoader(TensorDataset(self.ids, self.targets), batch_size=batch_size, shuffle=False, drop_last=True)

    def summary(self, every: int) -> dict[str, Any]:
        """What the card records: how much, how made, and one example to read."""
        return {"examples": len(self.prompts), "every": every, "answer_tokens": int(self.targets.sum()),
                "generation": "greedy, the teacher's chat template", "instructions": list(INSTRUCTIONS),
                "example": {"prompt": self.prompts[0], "answer": self.answers[0]}}

    def save(self, path: Path) -> None:
        """Through a temporary file: a kill mid-write never leaves a truncated set to resume from."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"ids": self.ids, "targets": self.targets, "prompts": self.prompts, "answers": self.answers}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SelfDistillSet:
        return cls(**torch.load(path, weights_only=True))


def self_distill_prompts(tokenizer: PreTrainedTokenizerBase, blocks: torch.Tensor, count: int,
                         seed: int) -> list[str]:
    """`count` instructions, each over a passage of `PASSAGE_TOKENS` tokens at a random place in the
    training `blocks` (n x len; one block each, so no passage runs across two documents)."""
    generator = torch.Generator().manual_seed(seed)
    length = min(PASSAGE_TOKENS, blocks.shape[1])
    rows = torch.randint(blocks.shape[0], (count,), generator=generator).tolist()
    starts = torch.randint(blocks.shape[1] - length + 1, (count,), generator=generator).tolist()
    kinds = torch.randint(len(INSTRUCTIONS), (count,), generator=generator).tolist()
    return [INSTRUCTIONS[kind].format(passage=_whole_words(tokenizer.decode(blocks[row, start : start + length])))
            for row, start, kind in zip(rows, starts, kinds)]


def _whole_words(text: str) -> str:
    """A passage cut at token boundaries starts and ends mid-word: drop the two partial words."""
    words = text.strip().split(" ")
    return " ".join(words[1:-1]) if len(words) > 2 else text.strip()


def generate_self_distill_set(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                              max_new_tokens: int, progress: bool = True) -> SelfDistillSet:
    """The teacher's greedy answers (at most `max_new_tokens` tokens, its end-of-turn token included
    when it stops) to `prompts` in its chat template."""
    was_training = teacher.training
    teacher.eval()
    examples = [greedy_chat_answer(teacher, tokenizer, prompt, max_new_tokens)
                for prompt in tqdm(prompts, desc="self-distill answers", unit="prompt", disable=not progress)]
    teacher.train(was_training)
    length = max(ids.shape[1] for ids, _ in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    targets = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (sequence, start) in enumerate(examples):
        ids[row, : sequence.shape[1]] = sequence[0]
        targets[row, start - 1 : sequence.shape[1] - 1] = True
    answers = [tokenizer.decode(sequence[0, start:], skip_special_tokens=True) for sequence, start in examples]
    return SelfDistillSet(ids, targets, prompts, answers)


def self_distill_set(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, blocks: torch.Tensor,
                     count: int, max_new_tokens: int, seed: int, path: Path, resume: bool, accelerator: Accelerator,
                     progress: bool = True) -> SelfDistillSet:
    """The run's set: loaded from `path` when resuming (or on the other processes, once the main one
    has written it), else generated by the main process on the accelerator's device and saved there."""
    with accelerator.main_process_first():
        if path.exists() and (resume or not accelerator.is_main_process):
            return SelfDistillSet.load(path)
        prompts = self_distill_prompts(tokenizer, blocks, count, seed)
        made = generate_self_distill_set(teacher.to(accelerator.device), tokenizer, prompts, max_new_tokens,
                                         progress and accelerator.is_local_main_process)
        made.save(path)
        return made


def interleaved(text: Iterable[Any], chat: Iterable[Any], every: int, start: int = 0) -> Iterator[Any]:
    """The batches of optimizer steps `start + 1, start + 2, ...`: step s takes the next chat batch
    when s is a multiple of `every`, else the next text batch; each loader is cycled on its own, so a
    resumed run draws what an uninterrupted one would have."""
    chats_before = start // every
    texts, chats = cycled(text, start - chats_before), cycled(chat, chats_before)
    for step in itertools.count(start + 1):
        yield next(chats) if step % every == 0 else next(texts)


def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per answer token, nothing else: the prompt is training text (the text
    steps cover it) and padding is no text at all. No cross-entropy on the answers: they are the
    teacher's own argmax tokens, so CE would only push the student to a sharper, one-hot copy of
    the teacher's top choice, while the KL already carries that choice and the rest of the distribution."""
    return distillation_loss(student_logits[targets], teacher_logits[targets], temperature)
