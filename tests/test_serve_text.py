"""TextStream: streamed text deltas add up to the whole text, cut at the first stop string,
with the bundled model's real tokenizer."""

from __future__ import annotations

import pytest

from kvrecall.serve.text import TextStream

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer():
    from kvrecall.models.smollm import load_tokenizer

    return load_tokenizer()


def stream_text(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(t) for t in tokenizer(text, add_special_tokens=False).input_ids]
    deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Paris is the capital. Lyon is not.", [], "Paris is the capital. Lyon is not."),
        ("Paris is the capital. Lyon is not.", ["."], "Paris is the capital"),
        ("Paris is the capital. Lyon is not.", ["Lyon", "capital"], "Paris is the "),
        ("Paris is the capital. Lyon is not.", ["Berlin"], "Paris is the capital. Lyon is not."),
        ("café ☕ crème", [], "café ☕ crème"),
    ],
)
def test_deltas_add_up_to_the_text_before_the_first_stop(tokenizer, text, stop, expected):
    deltas, stream = stream_text(tokenizer, text, stop)
    assert "".join(deltas) == stream.text == expected
    assert stream.stopped == (expected != text)
    assert all("\ufffd" not in d for d in deltas)


def test_a_possible_stop_string_is_held_back_until_it_cannot_match(tokenizer):
    stream = TextStream(tokenizer, ["STOP"])
    ids = tokenizer("go ST", add_special_tokens=False).input_ids
    released = "".join(stream.push(t) for t in ids)
    assert released == "go " and stream.finish() == "ST"
