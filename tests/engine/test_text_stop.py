"""Stop strings, matched on decoded text: the incremental decoder never releases half a character, a
stop string ends its request at once with the text cut just before it, and the batch-mates are untouched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aigc_dist.engine.decode import DecodeRequest, decode_steps, decode_stream
from aigc_dist.engine.streaming import IncrementalText, StopText, StreamedText
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import Artifact
from tests.engine.lm_artifacts import TOK
from tests.engine.reference import decode_all, random_prompts, tiny_model, torch_threads
from tests.models.bpe import bpe_tokenizer

MIXED = "ab é漢字🙂 cd\n為您 🍳!"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def test_incremental_text_releases_whole_characters_only_byte_by_byte_and_bpe() -> None:
    for tokenizer in (TOK, bpe_tokenizer()):
        ids = tokenizer.encode(MIXED)
        for chunk in (1, 2, 3):  # a token at a time, and several per step
            text = IncrementalText(tokenizer)
            pieces = [text.push(ids[k : k + chunk]) for k in range(0, len(ids), chunk)]
            pieces.append(text.finish())
            assert "".join(pieces) == MIXED == text.released and not any("\ufffd" in p for p in pieces)
    # Bytes that never become a character: released as decode() writes them, U+FFFD, at the latest at the end.
    text = IncrementalText(TOK)
    pieces = [text.push([b]) for b in b"a\xe6\xbc"] + [text.finish()]
    assert "".join(pieces) == TOK.decode(list(b"a\xe6\xbc")) and pieces[0] == "a"
    text = IncrementalText(TOK)
    assert "".join([text.push([0x80]), text.push([0x41]), text.finish()]) == TOK.decode([0x80, 0x41])


@pytest.mark.parametrize("stop", ["字🙂", "🙂", "é", " c", "d\n為", "🍳!"])
def test_a_stop_string_cuts_before_itself_and_never_splits_a_character(stop: str) -> None:
    ids = TOK.encode(MIXED)  # one byte per token: every character spelt out over 1-4 tokens
    text = StreamedText(TOK, (stop, "never there"))
    shown, steps = [], 0
    for token in ids:
        shown.append(text.push([token]))
        steps += 1
        if text.stopped:
            break
    shown.append(text.finish())
    expected = MIXED[: MIXED.index(stop)]
    assert "".join(shown) == text.shown == expected and not any("\ufffd" in p for p in shown)
    assert steps == len((expected + stop).encode())  # ended on the token that completed the stop string
    assert text.num_tokens == steps


def test_text_that_may_start_a_stop_string_is_held_until_it_cannot() -> None:
    stops = StopText(("xyz", "abc"))
    assert stops.feed("hello x") == "hello " and stops.held == "x"
    assert stops.feed("y") == "" and stops.feed("q") == "xyq"
    assert stops.feed("ab") == "" and stops.feed("xyz") == "ab" and stops.stopped  # "ab" + "xyz" -> stop at xyz
    assert stops.feed("more") == "" and stops.flush() == ""
    earliest = StopText(("cd", "bcde"))
    assert earliest.feed("abcd") == "ab" and earliest.stopped  # the first occurrence of any stop string
    end = StopText(("xyz",))
    assert end.feed("abxy") == "ab" and end.flush() == "xy"  # never became a stop string: shown at the end


def printable_stop(text: str) -> str:
    """A 3-character piece of ASCII from the middle of `text` on."""
    for k in range(len(text) // 2, len(text) - 3):
        piece = text[k : k + 3]
        if all(" " <= c <= "~" for c in piece):
            return piece
    raise AssertionError(f"no printable piece in {text!r}")


def test_stop_strings_end_their_request_and_leave_the_others_alone(random_lm: Artifact) -> None:
    greedy = SamplingParams(max_new_tokens=60, temperature=0)
    sampled = SamplingParams(max_new_tokens=50, temperature=1.0, top_k=40)
    plain = [TextRequest(prompt=p, sampling=greedy) for p in ("Hello", "A tent", "Copy:")]
    plain.append(TextRequest({"segment": "student"}, {"title": "Tent"}, seed=7, sampling=sampled))
    engine = TextEngine(random_lm, max_batch_size=2)
    free = engine.generate(plain)
    assert all(r.finish_reason == "length" and not r.finished for r in free)
    stop0, stop3 = printable_stop(free[0].text), printable_stop(free[3].text)
    stopped = [TextRequest(prompt="Hello", sampling=greedy, stop=("\x00\x00never", stop0)), plain[1], plain[2],
               TextRequest(plain[3].user, plain[3].item, seed=7, sampling=sampled, stop=(stop3,))]  # fmt: skip
    results = engine.generate(stopped)
    for k, stop in ((0, stop0), (3, stop3)):
        assert results[k].text == free[k].text[: free[k].text.index(stop)]
        assert results[k].finish_reason == "stop" and results[k].finished
        assert results[k].num_tokens < free[k].num_tokens and results[k].prompt_tokens == free[k].prompt_tokens
    assert results[1:3] == free[1:3]  # the others: the very same results
    # A stop string that never appears changes nothing, not even num_tokens.
    never = [TextRequest(r.user, r.item, r.seed, r.sampling, r.prompt, stop=("\x00\x01",)) for r in plain]
    assert engine.generate(never) == free


def test_decode_steps_and_end_keep_each_requests_tokens() -> None:
    model = tiny_model(5)
    requests = [DecodeRequest(p, 6 + 3 * k, temperature=0.9 if k % 2 else 0, seed=k)
                for k, p in enumerate(random_prompts(8, 6))]  # fmt: skip
    whole = decode_all(model, requests, slots=2)
    per_step: dict[int, list[int]] = {k: [] for k in range(len(requests))}
    ended: list[int] = []
    for events in decode_steps(model, requests, slots=2):
        assert len({i for i, _, _ in events}) == len(events) <= 2  # at most one event per slot and step
        for index, tokens, done in events:
            assert index not in ended
            per_step[index] += tokens
            if done:
                ended.append(index)
    assert [per_step[k] for k in range(len(requests))] == whole and sorted(ended) == list(range(len(requests)))
    # end: request 1 stops after 2 tokens, request 4 before it starts; slots go to the next requests.
    end: set[int] = {4}
    got: dict[int, list[int]] = {}
    stream = decode_stream(model, requests, slots=2, end=end)
    for index, tokens in stream:
        got[index] = tokens
    assert got[4] == [] and got[1] == whole[1] and not end
    cut: dict[int, list[int]] = {k: [] for k in range(len(requests))}
    for events in decode_steps(model, requests, slots=2, end=end):
        for index, tokens, _ in events:
            cut[index] += tokens
            if index == 1 and len(cut[1]) == 2:
                end.add(1)
    assert cut[1] == whole[1][:2] and all(cut[k] == whole[k] for k in range(len(requests)) if k != 1)
    # decode_stream(end=): ending every request at the first result answers each with what it has so far.
    end, early = set(), {}
    for index, tokens in decode_stream(model, requests, slots=2, end=end):
        early[index] = tokens
        if len(early) == 1:
            end.update(range(len(requests)))
    assert all(whole[k][: len(early[k])] == early[k] for k in range(len(requests)))
    assert any(0 < len(early[k]) < len(whole[k]) for k in range(len(requests)))  # a live one, cut mid-way
    assert sum(not early[k] for k in range(len(requests))) >= len(requests) - 2  # the waiting ones: no tokens
