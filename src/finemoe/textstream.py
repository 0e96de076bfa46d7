"""Incremental detokenization with stop strings, for streaming.

`TextStream` turns a growing list of token ids into text pieces that concatenate to the final
text. It never emits a piece that ends inside a multi-byte character (the decoded text ends in
U+FFFD until the character completes) and holds back a tail that could be the start of a stop
string, so a stop string never reaches the client. The final text is the concatenation of the
pieces: the same whether a client streams or not.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """Text of one request's generated tokens, piece by piece.

    Decoding works on a short window of tokens (the ones after the last complete character, as
    vLLM does): the new text is `decode(window + new)` minus `decode(window)`, so each token costs
    O(window), not O(length), and tokenizers that treat a sequence's first token specially
    (SentencePiece's leading space) see the same start in both decodes. `decoded` holds every
    complete character so far; `text` the part already emitted (held back: a possible stop-string
    start).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.decoded = ""  # complete characters decoded so far
        self.text = ""  # emitted so far (a prefix of `decoded`)
        self.stopped = False  # a stop string was found; `text` ends just before it
        self._start = 0  # window start: token index after which `decoded` ends on a whole character
        self._read = 0  # tokens whose text is in `decoded`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _advance(self, final: bool) -> None:
        """Move the newly completed characters into `decoded` (all of them when `final`)."""
        if self.tokenizer is None:
            return
        window = self.token_ids[self._start : self._read]
        before = self._decode(window)
        after = self._decode(self.token_ids[self._start :])
        if not final and (len(after) <= len(before) or not after.startswith(before)):
            return  # nothing new yet, or the tokenizer rewrote the window's text: wait for more
        if not final and after.endswith(REPLACEMENT):
            return  # a character is still incomplete
        self.decoded += after[len(before) :] if after.startswith(before) else ""
        self._start, self._read = self._read, len(self.token_ids)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; the new text that is safe to emit now ('' if none)."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        self._advance(final=False)
        return self._emit_safe(final=False)

    def finish(self) -> str:
        """The request ended: whatever is left (held-back text, incomplete characters)."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._emit_safe(final=True)

    def _emit_safe(self, final: bool) -> str:
        full = self.decoded
        end = self._find_stop(full)
        if end is not None:
            self.stopped = True
            return self._emit(full[:end])
        if final:
            return self._emit(full)
        return self._emit(full[: len(full) - self._stop_prefix_len(full)])

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text) :]
        self.text = upto
        return piece

    def _find_stop(self, full: str) -> int | None:
        """Index of the earliest stop string in the not yet emitted part of `full`, if any."""
        if not self.stop:
            return None
        start = len(self.text)  # emitted text never holds the start of a stop string
        hits = [i for s in self.stop if (i := full.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, full: str) -> int:
        """Length of the longest tail of `full` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best
