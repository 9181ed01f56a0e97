"""Turning a stream of token ids into text that is safe to send: whole characters, stop strings cut.

A byte-level tokenizer can split one character over several tokens, and a stop string can arrive
over several tokens too, so text is released only when it can no longer change: the decoded text
is held back while it ends in an incomplete character (U+FFFD) or in what might be the start of a
stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenizer with OpenAI `stop` strings (the stop string itself is not returned)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (may be empty). Sets `stopped` on a stop string."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith(INCOMPLETE):
            return ""
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._release(text[: max(self.sent, len(text) - hold)])

    def finish(self) -> str:
        """The rest of the text at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _first_stop(self, text: str) -> int | None:
        found = [index for s in self.stop if (index := text.find(s)) >= 0]
        return min(found) if found else None

    def _release(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
