"""A request's text as its tokens arrive: incremental detokenization and stop strings.

Tokens of a byte-level vocabulary can be partial UTF-8 (one byte of a three-byte character), and a
tokenizer's decoder can change the text of earlier tokens when later ones arrive (a character split
over tokens, a SentencePiece word start). `IncrementalText` decodes a short window of recent tokens
(the way vLLM and TGI detokenize) and releases text only once it ends on a complete character, so
what it releases is what `TextTokenizer.decode` of all the tokens starts with; at the end the text is
that full decode, exactly what a non-streamed request returns.

Stop strings are matched on that released text, never on tokens: a request ends as soon as its text
holds one, its text cut just before the first occurrence. Text that could still turn out to be the
start of a stop string is held back until it cannot, so nothing already handed to a client is ever
taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

from aigc_dist.models.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class IncrementalText:
    """The text of a growing token sequence, released in pieces that never split a character."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # the window decoded each step starts here (context for the decoder) ...
        self._read = 0  # ... and the text of tokens up to here has been released
        self._prefix_text = ""  # decode(tokens[_prefix:_read])
        self.released = ""

    def push(self, ids: Sequence[int]) -> str:
        """Append tokens; the newly released text ("" while the last character is incomplete)."""
        self.tokens.extend(ids)
        text = self.tokenizer.decode(self.tokens[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still being spelt out byte by byte
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self._prefix_text = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        self.released += new
        return new

    def finish(self) -> str:
        """The rest of the text once no more tokens come: `decode(tokens)` past what was released
        (incomplete characters at the end become U+FFFD, as in a non-streamed result), so that
        `released` is then exactly `decode(tokens)`."""
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.released):
            # A decoder that rewrote text it had released (none of the byte-level or SentencePiece ones
            # do): what was shown stands, and the request's text is that.
            return ""
        new = text[len(self.released) :]
        self.released = text
        return new


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; ValueError unless at most 4 non-empty strings."""
    if isinstance(stop, str):
        raise ValueError(f"stop must be a tuple of strings, not a string (got {stop!r}; write ({stop!r},))")
    stop = tuple(stop)
    if len(stop) > 4:
        raise ValueError(f"stop takes at most 4 strings (got {len(stop)})")
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings (got {stop!r})")
    return stop


class StopText:
    """Released text filtered through stop strings: what may be shown, and whether a stop string came."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.held = ""  # released text not shown yet: it ends like the start of a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """Take released text; return what can be shown now. After a stop string, everything from it
        on is dropped and `stopped` is True."""
        if self.stopped or not text:
            return ""
        held = self.held + text
        # Shown text never ends with a stop string's start, so a stop string begins in `held`.
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return held[: min(hits)]
        keep = self._partial(held)
        self.held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """At the end of the request: the held text (it never became a stop string)."""
        held, self.held = self.held, ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = min(len(text), max((len(s) for s in self.stop), default=1) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0


class StreamedText:
    """One request's shown text as its tokens arrive: `IncrementalText` through its `StopText`."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self._text = IncrementalText(tokenizer)
        self._stops = StopText(stop)
        self.num_tokens = 0  # tokens pushed (the generated ones, EOS excluded)
        self.shown = ""  # everything returned so far

    @property
    def stopped(self) -> bool:
        """A stop string has appeared: the request should end now, its text is complete."""
        return self._stops.stopped

    def push(self, ids: Sequence[int]) -> str:
        """Take the step's new tokens; return the text that may be shown now ("" often)."""
        self.num_tokens += len(ids)
        return self._show(self._stops.feed(self._text.push(ids)))

    def finish(self) -> str:
        """No more tokens: the rest of the text (held text, a character left incomplete), stop strings
        applied. `shown` is then the request's whole text."""
        rest = self._stops.feed(self._text.finish())
        return self._show(rest if self.stopped else rest + self._stops.flush())

    def _show(self, text: str) -> str:
        self.shown += text
        return text
