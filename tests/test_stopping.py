"""The stop-sequence checker on text that arrives a piece at a time."""

from __future__ import annotations

import pytest

from nanoengine.api.stopping import StopChecker


def feed_all(checker: StopChecker, pieces: list[str]) -> list[str]:
    out = []
    for piece in pieces:
        out.append(checker.feed(piece))
        if checker.stopped:
            break
    return out


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot():
    checker = StopChecker(["STOP"])
    assert feed_all(checker, ["abc S", "T", "x"]) == ["abc ", "", "STx"]
    assert not checker.stopped and checker.flush() == ""


def test_a_stop_string_split_across_pieces_is_cut_off():
    checker = StopChecker(["STOP"])
    assert feed_all(checker, ["abc ST", "O", "P and more"]) == ["abc ", "", ""]
    assert checker.stopped


def test_include_stop_str_keeps_the_stop_string_and_drops_what_follows():
    checker = StopChecker(["STOP"], include_stop=True)
    assert feed_all(checker, ["abc ST", "OP and more"]) == ["abc ", "STOP"]


@pytest.mark.parametrize(
    "stops, expected",
    [
        (["c", "ab"], "x"),  # the earliest occurrence wins, whatever the list order
        (["abc", "ab"], "x"),  # two starting together: the one complete first
        (["zz"], "xabcd"),  # never appears
    ],
)
def test_the_earliest_stop_string_wins(stops, expected):
    checker = StopChecker(stops)
    text = checker.feed("xabcd") + checker.flush()
    assert text == expected


def test_flush_releases_held_text_once_nothing_can_follow():
    checker = StopChecker(["</end>"])
    assert checker.feed("answer </en") == "answer "
    assert checker.flush() == "</en"


def test_no_stop_sequences_passes_text_through():
    checker = StopChecker([])
    assert feed_all(checker, ["a", "b"]) == ["a", "b"] and checker.flush() == ""
