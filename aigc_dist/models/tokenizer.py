"""Tokenizers of text models, in Hugging Face's `tokenizer.json` format (the `tokenizers` library).

`TextTokenizer` wraps whatever a checkpoint ships (a byte-level BPE of 32k-150k tokens, a
SentencePiece-style BPE with byte fallback, ...). `byte_level_tokenizer()` is the project's own:
a byte-level BPE with no merges, so token id b is the byte b (0..255), plus the special tokens
below at ids 256..263. It needs no training and no download, covers every language and emoji,
and `transformers.AutoTokenizer` opens it unchanged.

Text is always encoded with special tokens read as plain text: a user value that says "<eos>"
cannot end a prompt early. Prompts put special tokens in by id (`data/prompts.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Order fixes the ids of the byte-level tokenizer: SPECIAL_TOKENS[i] has id 256 + i. Append only.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<sep>", "<user>", "<item>", "<field>", "<value>")
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names the file and the field."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from tokenizer_config.json."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None, source: str = "tokenizer") -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # text never turns into control tokens
        self.config = dict(config or {})
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._tok_special: Tokenizer | None = None  # a second copy that reads special tokens in text
        # The project's byte-level tokenizer maps byte b to id b: Python's own UTF-8 encoder then gives
        # the same ids several times faster than a call into tokenizers per prompt field.
        probe = "a <eos> é 厨 🍳 \x00\n"
        self._bytes_are_ids = (tokenizer.get_vocab_size(with_added_tokens=False) == 256
                               and tokenizer.encode(probe, add_special_tokens=False).ids == list(probe.encode()))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the BOS/EOS a post-processor might add.

        Text that cannot be UTF-8 encoded (a lone surrogate) raises UnicodeEncodeError, a ValueError,
        so bad input is quarantined rather than silently altered.
        """
        data = text.encode("utf-8")
        return list(data) if self._bytes_are_ids else self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids of text written by a trusted template (a chat template's `<|im_start|>` and the
        like become their special tokens); never use it on user data."""
        if self._tok_special is None:
            self._tok_special = Tokenizer.from_str(self._tok.to_str())
            self._tok_special.encode_special_tokens = False
        return self._tok_special.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts in one call (the Rust side runs them together)."""
        data = [text.encode("utf-8") for text in texts]
        if self._bytes_are_ids:
            return [list(d) for d in data]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped. A model can emit half a UTF-8 character: that
        becomes U+FFFD. Ids outside 0..vocab_size-1 raise ValueError (a model/tokenizer mismatch)."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's range 0..{self.vocab_size - 1}")
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        """Id of a token (special or not) by its text, or None when the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def special_id(self, token: str) -> int:
        """Id of a special token; TokenizerError naming the file when the tokenizer has none."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {TOKENIZER_FILE} has no token {token!r}")
        return token_id

    def _configured_id(self, key: str) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
            value = value.get("content")
        return self._tok.token_to_id(value) if isinstance(value, str) else None

    @property
    def bos_id(self) -> int | None:
        return self._configured_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._configured_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._configured_id("pad_token")

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None

    def files(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json, as a checkpoint directory holds them."""
        return {
            TOKENIZER_FILE: self._tok.to_str(pretty=False).encode("utf-8"),
            TOKENIZER_CONFIG_FILE: json.dumps(self.config, indent=2, ensure_ascii=False).encode("utf-8"),
        }

    @classmethod
    def from_files(cls, tokenizer_json: bytes, tokenizer_config: bytes | None, source: str) -> TextTokenizer:
        """Rebuild from a checkpoint's files; TokenizerError naming the file when one is unreadable."""
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception subclass on a malformed file
            raise TokenizerError(f"{source}/{TOKENIZER_FILE} is not a tokenizers file: {exc}") from None
        config: dict[str, Any] = {}
        if tokenizer_config is not None:
            try:
                config = json.loads(tokenizer_config)
            except (ValueError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{source}/{TOKENIZER_CONFIG_FILE} is not JSON: {exc}") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{source}/{TOKENIZER_CONFIG_FILE} must hold a JSON object")
        return cls(tokenizer, config, source)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def byte_level_tokenizer(max_length: int = 256) -> TextTokenizer:
    """The project's tokenizer: id b = byte b (0..255), then SPECIAL_TOKENS at 256..263."""
    chars = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    # use_regex=False: with no merges, splitting into words first would only cost time.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
    }
    return TextTokenizer(tokenizer, config, "aigc-dist byte-level tokenizer")
