"""Byte-level tokenizer: UTF-8 bytes (ids 0..255) plus a fixed list of special tokens (ids 256..).

Bytes need no vocabulary file and no download, and cover every language and emoji; the price is
longer sequences (a Chinese character is 3 tokens), which is fine for short recommendation copy.
"""

from collections.abc import Sequence
from typing import Any

# Order fixes the ids: SPECIAL_TOKENS[i] has id 256 + i. Append only; reordering breaks artifacts.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<sep>",
    "<user>",
    "<item>",
    "<field>",
    "<value>",
)

_NUM_BYTES = 256
_SPECIAL_IDS: dict[str, int] = {name: _NUM_BYTES + i for i, name in enumerate(SPECIAL_TOKENS)}


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus special tokens (ids 256.. in SPECIAL_TOKENS order)."""

    kind = "byte"
    pad_id: int = _SPECIAL_IDS["<pad>"]  # 256, fills the left of shorter prompts in a batch
    bos_id: int = _SPECIAL_IDS["<bos>"]  # 257, starts every prompt
    eos_id: int = _SPECIAL_IDS["<eos>"]  # 258, ends a generated copy
    sep_id: int = _SPECIAL_IDS["<sep>"]  # 259, separates the prompt from the target copy
    user_id: int = _SPECIAL_IDS["<user>"]  # 260, marks the start of user features in a prompt
    item_id: int = _SPECIAL_IDS["<item>"]  # 261, marks the start of item features
    field_id: int = _SPECIAL_IDS["<field>"]  # 262, precedes a field name
    value_id: int = _SPECIAL_IDS["<value>"]  # 263, precedes a field value
    vocab_size: int = _NUM_BYTES + len(SPECIAL_TOKENS)  # 264

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of `text` as ids; never emits special ids.

        Text that cannot be UTF-8 encoded (lone surrogates) raises UnicodeEncodeError, a ValueError,
        so that bad input is quarantined rather than silently altered.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids back into text, dropping special ids (EOS does not stop decoding).

        Byte runs that are not valid UTF-8 (a model can emit half a character) become U+FFFD instead of
        raising. Ids outside 0..vocab_size-1 raise ValueError: they mean a model/tokenizer mismatch.
        """
        out = bytearray()
        for i in ids:
            if 0 <= i < _NUM_BYTES:
                out.append(i)
            elif not _NUM_BYTES <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the byte tokenizer's range 0..{self.vocab_size - 1}"
                )
        return out.decode("utf-8", errors="replace")

    def special_id(self, name: str) -> int:
        """Id of a special token by name, e.g. special_id("<eos>") == 258."""
        try:
            return _SPECIAL_IDS[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data description stored in an artifact's config.json."""
        return {"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ByteTokenizer":
        """Rebuild from `to_dict()` output; ValueError naming the bad key or value otherwise."""
        if not isinstance(d, dict):
            raise ValueError(f"tokenizer config must be a dict (got {type(d).__name__})")
        unknown = sorted(set(d) - {"kind", "special_tokens"})
        if unknown:
            raise ValueError(f"tokenizer config has unknown keys: {', '.join(map(str, unknown))}")
        if d.get("kind") != cls.kind:
            raise ValueError(f"tokenizer config 'kind' must be {cls.kind!r} (got {d.get('kind')!r})")
        # The ids are fixed by SPECIAL_TOKENS; an artifact trained with another list would decode wrongly.
        specials = d.get("special_tokens")
        if not isinstance(specials, list | tuple) or list(specials) != list(SPECIAL_TOKENS):
            raise ValueError(
                f"tokenizer config 'special_tokens' must be {list(SPECIAL_TOKENS)} (got {specials!r})"
            )
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
