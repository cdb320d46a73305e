"""The catalog's clock (shared/catalog/clock.py): until a first measurement has succeeded no
reader falls back to its own clock while another thread measures."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shared.catalog import clock


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    saved = dict(clock._state)
    clock._state.update(offset=0.0, measured=float("-inf"), reported=0.0, known=0.0)
    yield
    clock._state.update(saved)


def test_a_reader_waits_for_the_first_measurement_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    measuring, finish = threading.Event(), threading.Event()

    def slow_measure() -> float:
        measuring.set()
        assert finish.wait(30)
        return 420.0

    monkeypatch.setattr(clock, "_measure", slow_measure)
    first: list[float] = []
    measurer = threading.Thread(target=lambda: first.append(clock.offset()))
    measurer.start()
    assert measuring.wait(30)
    seen: list[float] = []
    reader = threading.Thread(target=lambda: seen.append(clock.offset()))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive()  # it waits for the measurement instead of answering 0
    finish.set()
    measurer.join(30)
    reader.join(30)
    assert (first, seen) == ([420.0], [420.0])


def test_a_failed_first_measurement_is_tried_again_and_then_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([None, 12.5])
    calls: list[int] = []

    def measure() -> float | None:
        calls.append(1)
        return next(answers)

    monkeypatch.setattr(clock, "_measure", measure)
    assert clock.offset() == 0.0  # the catalog did not answer: nothing to add yet
    clock._state["measured"] -= clock.RETRY_UNKNOWN  # a second later
    assert clock.offset() == 12.5
    assert clock.offset() == 12.5  # measured: not again before MEASURE_EVERY
    assert len(calls) == 2
