"""Turning a stream of token ids into text that is safe to send: whole characters, stop strings cut.

A byte-level tokenizer can split one character over several tokens, and a stop string can arrive
over several tokens too, so text is released only when it can no longer change: new text is held
back while it ends in an incomplete character (U+FFFD) or in what might be the start of a stop
string.

Each token is decoded in a short window, not with the whole completion (which would cost a decode
of every earlier token per token): the tokens since the last release, after the few before them as
context, and the new text is what the window adds to its context's text. Decoding a window with
context gives what the whole decode gives there (a tokenizer that drops a word's leading space at
the start of a text drops it from the context, not from the new text), as in vLLM's and TGI's
incremental detokenizers.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenizer with OpenAI `stop` strings (the stop string itself is not returned)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # the decoded text of tokens[:self._read]
        self._context = 0  # tokens[self._context:self._read]: the context the next window decodes after
        self._read = 0
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (may be empty). Sets `stopped` on a stop string."""
        self.tokens.append(token)
        if not self._decode_window(final=False):
            return ""
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._release(max(self.sent, len(self.text) - hold))

    def finish(self) -> str:
        """The rest of the text at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        self._decode_window(final=True)
        return self._release(len(self.text))

    def _decode_window(self, final: bool) -> bool:
        """Extend `text` with the tokens not yet decoded; False (and nothing decoded) while they end
        inside a character, unless `final`."""
        context = self._decode(self.tokens[self._context:self._read])
        window = self._decode(self.tokens[self._context:])
        if window.endswith(INCOMPLETE) and not final:
            return False
        self.text += window[len(context):]
        self._context, self._read = self._read, len(self.tokens)
        return True

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""

    def _first_stop(self) -> int | None:
        """Where the first stop string starts. Only unsent text can hold one: a stop string starting in
        sent text would have been whole, and found, before that text was released."""
        found = [index for s in self.stop if (index := self.text.find(s, self.sent)) >= 0]
        return min(found) if found else None

    def _release(self, end: int) -> str:
        new = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return new
