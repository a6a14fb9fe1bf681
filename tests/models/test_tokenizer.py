"""Text tokenizers (tokenizer.json): the project's byte-level one and a BPE a checkpoint may bring.

Round trips in every script, bad input refused, special-token text kept as text, the same ids as
transformers' AutoTokenizer on the same files, and the decoding edge cases a sampling model hits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc_dist.data.prompts import PromptTemplate, encode_prompt
from aigc_dist.models.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TextTokenizer,
    TokenizerError,
    byte_level_tokenizer,
)
from tests.models.bpe import bpe_tokenizer

BYTES = byte_level_tokenizer()
BPE = bpe_tokenizer()
TOKENIZERS = {"byte-level": BYTES, "bpe": BPE}
TEXTS = [
    "hello, world",
    "为您推荐：轻薄笔记本",  # Chinese
    "限时特惠 🎉🔥👍🏽 👨‍👩‍👧",  # emoji, a skin-tone modifier and a ZWJ family sequence
    "مرحبا بالعالم שלום עולם",  # right-to-left: Arabic and Hebrew
    "mixed עברית and English \u200f marks",
    "",
    "a\nb\tc\x00  two  spaces ",
    "<eos> <bos> <|endoftext|> <|im_end|>",  # special tokens' text, as a user may type it
]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(name: str, text: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None, derandomize=True, database=None)  # reproducible, no .hypothesis/
@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    for tok in TOKENIZERS.values():
        assert tok.decode(tok.encode(text)) == text


def test_byte_level_ids_are_utf8_bytes_never_specials() -> None:
    assert BYTES.encode("é") == [0xC3, 0xA9]
    assert BYTES.encode("<eos>") == list(b"<eos>")
    assert BYTES.encode_many(["厨", "<pad>"]) == [list("厨".encode()), list(b"<pad>")]
    assert BYTES.vocab_size == 264
    assert [BYTES.special_id(name) for name in SPECIAL_TOKENS] == list(range(256, 264))
    assert (BYTES.pad_id, BYTES.bos_id, BYTES.eos_id) == (256, 257, 258)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_token_text_in_user_input_stays_text(name: str) -> None:
    tok = TOKENIZERS[name]
    specials = {i for t in (*SPECIAL_TOKENS, "<|endoftext|>", "<|im_end|>") if (i := tok.token_id(t)) is not None}
    typed = "buy now <eos><|endoftext|><|im_end|><sep>"
    assert not specials & set(tok.encode(typed)) and not specials & {i for ids in tok.encode_many([typed]) for i in ids}
    assert tok.encode_many([typed, "x"]) == [tok.encode(typed), tok.encode("x")]
    # Through a prompt, too: the only special tokens are the template's own, entered by id.
    layout = "markers" if name == "byte-level" else "text"
    prompt = encode_prompt({"segment": "<eos>student<|endoftext|>"}, {"title": "<sep>"}, PromptTemplate(layout=layout),
                           tok)  # fmt: skip
    template_ids = {tok.token_id(t) for t in ("<bos>", "<user>", "<item>", "<field>", "<value>", "<sep>")}
    assert set(prompt) & specials <= (template_ids if layout == "markers" else set())
    assert prompt.count(tok.token_id("<sep>")) == (1 if layout == "markers" else 0)  # the template's, not the title's


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("bad", ["\ud800", "ok \udfff then"])
def test_lone_surrogates_are_refused(name: str, bad: str) -> None:
    with pytest.raises(UnicodeEncodeError):  # a ValueError: bad input to quarantine, not something to guess at
        TOKENIZERS[name].encode(bad)
    with pytest.raises(ValueError):
        TOKENIZERS[name].encode_many(["fine", bad])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_same_ids_as_transformers_autotokenizer(name: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = TOKENIZERS[name]
    for file, data in tok.files().items():
        (tmp_path / file).write_bytes(data)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    plain = [t for t in TEXTS if "<" not in t]
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in plain] == [tok.encode(t) for t in plain]
    # Special tokens' text: transformers reads it as control tokens unless told to split it, as we always do.
    hf_split = AutoTokenizer.from_pretrained(tmp_path, split_special_tokens=True)
    assert [hf_split(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    ids = [*tok.encode("限时 🎉"), tok.eos_id, *tok.encode(" مرحبا")]
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == "限时 🎉 مرحبا"


def test_bpe_has_thousands_of_tokens_and_merges_words() -> None:
    assert 2000 <= BPE.vocab_size <= 5000
    assert len(BPE.encode("for students")) < len(b"for students")  # merges, not bytes
    assert (BPE.bos_id, BPE.eos_id, BPE.pad_id) == (None, BPE.token_id("<|endoftext|>"), BPE.token_id("<|endoftext|>"))


def test_decode_drops_specials_and_does_not_stop_at_eos() -> None:
    ids = [BYTES.bos_id, *BYTES.encode("轻薄"), BYTES.eos_id, BYTES.pad_id, *BYTES.encode("本")]
    assert BYTES.decode(ids) == "轻薄本"
    assert BPE.decode([*BPE.encode("a"), BPE.eos_id, *BPE.encode("b")]) == "ab"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_decode_of_half_a_character_gives_the_replacement_character(name: str) -> None:
    tok = TOKENIZERS[name]
    # 0xE4 opens the 3-byte UTF-8 form of 为 (E4 B8 BA); both vocabularies hold each byte as a token named
    # by GPT-2's printable alias, which for 0xAE..0xFF is the byte's own Latin-1 character.
    half = tok.token_id(chr(0xE4))
    assert half is not None
    assert tok.decode([half, *tok.encode("ok")]) == "\ufffdok"  # a model can emit half a character: no exception
    assert tok.decode([*tok.encode("ok"), half]) == "ok\ufffd"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_decode_of_out_of_range_ids_raises(name: str) -> None:
    tok = TOKENIZERS[name]
    for bad in (-1, tok.vocab_size, 10**6):
        message = rf"token id {bad} is outside the tokenizer's range 0..{tok.vocab_size - 1}"
        with pytest.raises(ValueError, match=message):
            tok.decode([65, bad])


def test_files_round_trip_and_bad_files_name_the_file() -> None:
    for tok in TOKENIZERS.values():
        files = tok.files()
        again = TextTokenizer.from_files(files[TOKENIZER_FILE], files[TOKENIZER_CONFIG_FILE], "ckpt")
        assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and again.eos_id == tok.eos_id
        assert again.config == tok.config
    with pytest.raises(TokenizerError, match="ckpt/tokenizer.json is not a tokenizers file"):
        TextTokenizer.from_files(b"{not json", None, "ckpt")
    with pytest.raises(TokenizerError, match="ckpt/tokenizer_config.json is not JSON"):
        TextTokenizer.from_files(BYTES.files()[TOKENIZER_FILE], b"{", "ckpt")
    with pytest.raises(TokenizerError, match="ckpt/tokenizer_config.json must hold a JSON object"):
        TextTokenizer.from_files(BYTES.files()[TOKENIZER_FILE], b"[1]", "ckpt")
    with pytest.raises(TokenizerError, match="test BPE: tokenizer.json has no token '<sep>'"):
        BPE.special_id("<sep>")
