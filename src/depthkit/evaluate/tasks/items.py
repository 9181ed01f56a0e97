"""Multiple-choice items from a book's sentences: a LAMBADA-style cloze and a HellaSwag-style
next-sentence choice, each with 3 distractors (chance = 25%).

What makes an item fair:
- cloze: the passage (60-150 words) ends with a content word (no stopword, >= 3 letters, preceded
  by a space so no "to-morrow" halves) that does not occur earlier in the passage (no copying).
  Its distractors are other sentence-final words of the same book (the kind of word that ends a
  sentence) with the same capitalisation (a name competes with names), the same ending (-ly, -ing,
  -ed, -s) and a similar length and frequency, so no candidate is wrong by its shape alone;
- continuation: 30-80 words of context, then the true next sentence (6-40 words) among three real
  sentences of the same book of similar length, taken at least `MIN_DISTANCE` sentences away and
  with the same quotation marks at both ends, so dialogue is never told apart from narration by its
  punctuation.
Passages never overlap, and every random choice is seeded by (seed, task, book, position): an item's
content does not depend on which other items are sampled. The answer's position is balanced over
the four slots, so a model with a position bias still scores exactly chance.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from depthkit.evaluate.tasks.text import STOPWORDS, word_count, word_frequencies

NUM_CHOICES = 4
CLOZE_WORDS = (60, 150)
CONTEXT_WORDS = (30, 80)
ANSWER_WORDS = (6, 40)
MIN_DISTANCE = 10
_FINAL_WORD = re.compile(r"(?<=\s)([A-Za-z]+)[.!?][\"')\]]*$")


@dataclass
class Item:
    """One multiple-choice question, as written to the task's JSONL file."""

    id: str
    book: str
    position: int  # index of the answer's sentence in the book's held-out sentences
    context: str
    choices: list[str]
    label: int

    def to_dict(self) -> dict:
        return asdict(self)


def final_word(sentence: str) -> str | None:
    """The sentence's last word if it can be a cloze answer (content word, >= 3 letters), else None."""
    match = _FINAL_WORD.search(sentence)
    if not match:
        return None
    word = match.group(1)
    return word if len(word) >= 3 and word.lower() not in STOPWORDS else None


def _passage_start(sentences: list[str], end: int, earliest: int, words: tuple[int, int]) -> int | None:
    """First sentence of the shortest passage ending at `end` with >= words[0] words (None if too long)."""
    total = 0
    for start in range(end, earliest - 1, -1):
        total += word_count(sentences[start])
        if total >= words[0]:
            return start if total <= words[1] else None
    return None


def _suffix(word: str) -> str:
    lower = word.lower()
    return next((s for s in ("ly", "ing", "ed") if lower.endswith(s)), "s" if lower.endswith("s") else "")


class ClozeBuilder:
    """Cloze items of one book: the passage without its last word; choose that word among 4."""

    name = "depthkit_cloze"

    def __init__(self, book: str, sentences: list[str]):
        self.book, self.sentences = book, sentences
        self.frequency = word_frequencies(sentences)
        finals = {w for w in map(final_word, sentences) if w}
        self.pool = sorted(finals)

    def candidates(self) -> list[int]:
        """Sentence indices that end a usable, non-overlapping passage."""
        out, free = [], 0
        for end in range(len(self.sentences)):
            if self._passage(end, free) is not None:
                out.append(end)
                free = end + 1
        return out

    def _passage(self, end: int, earliest: int) -> tuple[str, str] | None:
        """(context, answer) of the passage ending at sentence `end`, or None if it makes no fair item.

        An answer that already occurs in its context is refused: copying would find it without
        understanding the passage.
        """
        answer = final_word(self.sentences[end])
        start = _passage_start(self.sentences, end, earliest, CLOZE_WORDS) if answer else None
        if start is None:
            return None
        last = self.sentences[end]
        context = " ".join([*self.sentences[start:end], last[: _FINAL_WORD.search(last).start()].rstrip()])
        if re.search(rf"\b{answer}\b", context, re.IGNORECASE):
            return None
        return context, answer

    def item(self, end: int, rng: random.Random, label: int) -> Item | None:
        """The item ending at sentence `end` (None if the book has too few words to choose from)."""
        context, answer = self._passage(end, 0)
        pool = self._similar_words(answer)
        if len(pool) < NUM_CHOICES - 1:
            return None
        return _placed(self.name, self.book, end, context, answer, rng.sample(pool, NUM_CHOICES - 1), label)

    def _similar_words(self, answer: str) -> list[str]:
        """Distractor pool, widened step by step until it holds enough words."""
        log_freq = math.log(self.frequency[answer])
        pool = [w for w in self.pool if w.lower() != answer.lower() and w[0].isupper() == answer[0].isupper()]
        for max_len, max_ratio, same_suffix in ((1, 2, True), (2, 4, True), (3, 8, False), (99, 1e9, False)):
            words = [
                w for w in pool
                if abs(len(w) - len(answer)) <= max_len
                and abs(math.log(self.frequency[w]) - log_freq) <= math.log(max_ratio)
                and (not same_suffix or _suffix(w) == _suffix(answer))
            ]
            if len({w.lower() for w in words}) >= NUM_CHOICES - 1:
                return _unique_lower(words)
        return _unique_lower(pool)


class ContinuationBuilder:
    """Continuation items of one book: a passage, then its true next sentence among 4 sentences."""

    name = "depthkit_continuation"

    def __init__(self, book: str, sentences: list[str]):
        self.book, self.sentences = book, sentences
        self.lengths = [word_count(s) for s in sentences]

    def _answer_ok(self, index: int) -> bool:
        return ANSWER_WORDS[0] <= self.lengths[index] <= ANSWER_WORDS[1]

    def candidates(self) -> list[int]:
        out, free = [], 0
        for answer in range(1, len(self.sentences)):
            if self._answer_ok(answer) and _passage_start(self.sentences, answer - 1, free, CONTEXT_WORDS) is not None:
                out.append(answer)
                free = answer + 1
        return out

    def item(self, answer: int, rng: random.Random, label: int) -> Item | None:
        """The item answered by sentence `answer` (None if too few sentences can stand beside it)."""
        start = _passage_start(self.sentences, answer - 1, 0, CONTEXT_WORDS)
        context = " ".join(self.sentences[start:answer])
        pool = self._similar_sentences(answer, set(self.sentences[start : answer + 1]))
        if len(pool) < NUM_CHOICES - 1:
            return None
        distractors = rng.sample(pool, NUM_CHOICES - 1)
        return _placed(self.name, self.book, answer, context, self.sentences[answer], distractors, label)

    def _similar_sentences(self, answer: int, exclude: set[str]) -> list[str]:
        """Far-away sentences with the answer's quotation marks and a similar length (widened if needed)."""
        target, shape = self.lengths[answer], _quote_shape(self.sentences[answer])
        far = [
            i for i in range(len(self.sentences))
            if abs(i - answer) > MIN_DISTANCE and self.sentences[i] not in exclude
            and _quote_shape(self.sentences[i]) == shape
        ]
        for ratio in (1.25, 1.5, 2.0, 1e9):
            texts = sorted({self.sentences[i] for i in far if 1 / ratio <= self.lengths[i] / target <= ratio})
            if len(texts) >= NUM_CHOICES - 1:
                return texts
        return sorted({self.sentences[i] for i in far})


def _quote_shape(sentence: str) -> tuple[bool, bool]:
    return sentence.startswith(('"', "'")), sentence.rstrip(")]").endswith(('"', "'"))


def _unique_lower(words: list[str]) -> list[str]:
    """One form per lower-cased word, so no two candidates differ by case only."""
    seen: dict[str, str] = {}
    for w in words:
        seen.setdefault(w.lower(), w)
    return sorted(seen.values())


def _placed(task: str, book: str, position: int, context: str, answer: str, distractors: list[str],
            label: int) -> Item:
    """The item with the answer at `label` (labels are balanced by the caller: no position bias)."""
    choices = [*distractors]
    choices.insert(label, answer)
    return Item(f"{task}/{book}/{position}", book, position, context, choices, label)


BUILDERS = {b.name: b for b in (ClozeBuilder, ContinuationBuilder)}


def build_items(task: str, books: dict[str, list[str]], size: int, seed: int) -> tuple[list[Item], int]:
    """`size` items of `task` sampled from every book's candidates, and the number of candidates.

    Fewer candidates than `size` returns them all (the caller decides whether that is enough). A
    candidate that cannot make a fair item (a short play has too few sentences of the answer's shape
    to serve as distractors) is replaced by an unused candidate, drawn in a seeded order.
    """
    builders = [BUILDERS[task](book, sentences) for book, sentences in books.items()]
    pool = [(b, position) for b in builders for position in b.candidates()]
    rng = random.Random(f"{seed}:{task}")
    chosen = sorted(rng.sample(range(len(pool)), min(size, len(pool))))
    labels = [i % NUM_CHOICES for i in range(len(chosen))]
    rng.shuffle(labels)
    taken = set(chosen)
    spare = [i for i in range(len(pool)) if i not in taken]
    random.Random(f"{seed}:{task}:spare").shuffle(spare)
    items = []
    for index, label in zip(chosen, labels):
        item = _make(pool, index, seed, task, label)
        while item is None and spare:
            item = _make(pool, spare.pop(), seed, task, label)
        if item is not None:
            items.append(item)
    return items, len(pool)


def _make(pool: list, index: int, seed: int, task: str, label: int) -> Item | None:
    builder, position = pool[index]
    return builder.item(position, random.Random(f"{seed}:{task}:{builder.book}:{position}"), label)


def label_balance(items: list[Item]) -> dict[int, int]:
    return dict(sorted(Counter(it.label for it in items).items()))
