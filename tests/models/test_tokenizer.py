import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc_dist.models.tokenizer import SPECIAL_TOKENS, ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize(
    "text", ["hello, world", "为您推荐：轻薄笔记本", "限时特惠 🎉🔥👍🏽", "", "a\nb\tc\x00"]
)
def test_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


@settings(max_examples=200, deadline=None, derandomize=True, database=None)  # reproducible, no .hypothesis/
@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    assert TOK.decode(TOK.encode(text)) == text


def test_encode_is_utf8_bytes_never_specials() -> None:
    assert TOK.encode("é") == [0xC3, 0xA9]
    assert TOK.encode("<eos>") == list(b"<eos>")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate is bad input, not something to guess at
        TOK.encode("\ud800")


def test_special_ids_follow_special_tokens_order() -> None:
    expected = {
        "pad_id": 256, "bos_id": 257, "eos_id": 258, "sep_id": 259,
        "user_id": 260, "item_id": 261, "field_id": 262, "value_id": 263,
    }  # fmt: skip
    assert {name: getattr(TOK, name) for name in expected} == expected
    assert TOK.vocab_size == 264
    assert [TOK.special_id(name) for name in SPECIAL_TOKENS] == list(range(256, 264))


def test_special_id_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError, match="<mask>.*<eos>"):
        TOK.special_id("<mask>")


def test_decode_drops_specials_and_does_not_stop_at_eos() -> None:
    ids = [TOK.bos_id, *TOK.encode("轻薄"), TOK.eos_id, TOK.pad_id, *TOK.encode("本")]
    assert TOK.decode(ids) == "轻薄本"


def test_decode_invalid_utf8_is_replaced_not_raised() -> None:
    broken = TOK.encode("笔")[:2] + TOK.encode("ok")  # half a character, as a model may emit
    assert TOK.decode(broken) == "\ufffdok"
    assert TOK.decode([0xFF]) == "\ufffd"


@pytest.mark.parametrize("bad_id", [-1, 264, 10_000])
def test_decode_out_of_range_id_raises(bad_id: int) -> None:
    with pytest.raises(ValueError, match=str(bad_id)):
        TOK.decode([65, bad_id])


def test_dict_round_trip() -> None:
    d = TOK.to_dict()
    assert d == {"kind": "byte", "special_tokens": list(SPECIAL_TOKENS)}
    assert ByteTokenizer.from_dict(d) == TOK


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        ({"kind": "bpe", "special_tokens": list(SPECIAL_TOKENS)}, "kind"),
        ({"special_tokens": list(SPECIAL_TOKENS)}, "kind"),
        ({"kind": "byte"}, "special_tokens"),
        ({"kind": "byte", "special_tokens": ["<pad>", "<eos>"]}, "special_tokens"),
        ({"kind": "byte", "special_tokens": "<pad><bos>"}, "special_tokens"),
        ({"kind": "byte", "special_tokens": list(SPECIAL_TOKENS), "vocab": 300}, "vocab"),
        (["byte"], "dict"),
    ],
)
def test_from_dict_rejects_bad_dicts(bad: object, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        ByteTokenizer.from_dict(bad)  # type: ignore[arg-type]
