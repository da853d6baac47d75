"""Generated token ids -> text deltas for a stream, cut at the first stop string."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Detokenizes one completion incrementally.

    Each push decodes the whole completion so far (completions are short next to a decode step)
    and releases only text that can no longer change: an unfinished UTF-8 character and a tail
    that may still grow into a stop string are held back. `stopped` turns True at the first
    stop string; the text ends before it."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that became final (possibly empty). Ignored once stopped."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._release(cut)
        self.text = text
        ready = len(text) - (1 if text.endswith("\ufffd") else 0)
        return self._release(min(ready, len(text) - self._stop_prefix(text)))

    def finish(self) -> str:
        """The held-back rest, at the end of the generation."""
        return self._release(len(self.text))

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)  # fmt: skip

    def _release(self, upto: int) -> str:
        delta = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta
