"""The CPU thread count nanoengine chooses (threads.py): the idle CPUs, or what $NANOENGINE_THREADS says."""

from __future__ import annotations

import pytest

from nanoengine import InvalidParameterError
from nanoengine import threads


def test_the_default_is_the_idle_cpus_and_at_least_one(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    for busy, expected in [(0.0, 8), (2.6, 5), (7.8, 1), (30.0, 1)]:
        monkeypatch.setattr(threads, "busy_cpus", lambda busy=busy: busy)
        assert threads.default_threads() == expected


@pytest.mark.parametrize(("value", "expected"), [("3", 3), (" keep ", None), ("AUTO", "default"), ("", "default")])
def test_the_environment_overrides_it(monkeypatch, value, expected):
    monkeypatch.setattr(threads, "default_threads", lambda: "default")
    monkeypatch.setenv(threads.THREADS_ENV, value or "auto")
    assert threads.threads_setting() == expected


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_setting_is_named(monkeypatch, value):
    monkeypatch.setenv(threads.THREADS_ENV, value)
    with pytest.raises(InvalidParameterError, match="NANOENGINE_THREADS must be a positive number"):
        threads.threads_setting()
