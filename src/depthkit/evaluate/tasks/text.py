"""Sentences and words of a book, cleaned for building multiple-choice items.

Line-wrapped book text is turned into paragraphs (blank-line separated), stripped of italics
marks and headings (CHAPTER 3, VOLUME II, FINIS), and cut into sentences. The sentence splitter
knows the abbreviations of 19th-century prose (Mr., Mrs., Col., initials like "W.") so that
"Mr. Darcy" never ends a sentence, which would make broken items.
"""

from __future__ import annotations

import re
from collections import Counter

_HEADING = re.compile(r"^(chapter|volume|book|act|scene)\b|^(finis|the end)\W*$", re.IGNORECASE)
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(]?[A-Z])")
_ABBREVIATIONS = {"mr", "mrs", "dr", "st", "col", "capt", "messrs", "lt", "gen", "esq", "rev", "sir", "no"}
WORD = re.compile(r"[A-Za-z]+")

_STOPWORD_TEXT = """
a an the and or but nor so yet for of to in on at by with from as into onto upon about than then
that this these those there here what which who whom whose when where why how it its it's is was be
been being am are were do does did done have has had having not no yes i me my mine we us our you
your yours he him his she her hers they them their theirs one ones all any some each every such very
much more most less least own same other others too also only just even ever never can could shall
should will would may might must said say says sir madam ma'am mr mrs miss oh ah well now again
still
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def paragraphs(text: str) -> list[str]:
    """Paragraphs of line-wrapped text, whitespace collapsed, headings and italics marks removed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.replace("_", "").split())
        if para and not _HEADING.match(para) and not para.isupper():
            out.append(para)
    return out


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph; a period after an abbreviation or an initial is no boundary."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        before = paragraph[start : match.start()].rsplit(" ", 1)[-1].strip("\"'(").lower()
        if paragraph[match.start()] == "." and (before in _ABBREVIATIONS or len(before) == 1):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def book_sentences(text: str) -> list[str]:
    """All sentences of a text, in order."""
    return [s for para in paragraphs(text) for s in split_sentences(para)]


def word_count(text: str) -> int:
    return len(text.split())


def word_frequencies(sentences: list[str]) -> Counter:
    """Counts of each exact word form (case kept: names stay apart from common words)."""
    return Counter(w for s in sentences for w in WORD.findall(s))
