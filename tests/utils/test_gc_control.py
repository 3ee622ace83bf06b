"""utils/gc_control.py: freezing the start-up heap and timing the collector's pauses."""

import gc
import logging

import pytest

from megatron_vespo.utils.gc_control import GcPauses, freeze_gc


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # other tests must not inherit a frozen heap


def test_freeze_moves_the_live_heap_out_of_later_collections(unfrozen):
    gc.unfreeze()
    keep = [[i] for i in range(1000)]  # tracked objects alive at the freeze
    counts = freeze_gc("a test")
    assert counts["frozen"] == gc.get_freeze_count() >= 1000 and counts["tracked_before"] >= counts["frozen"]
    assert not any(o is keep for o in gc.get_objects())  # frozen objects leave the collector's generations
    again = freeze_gc("a test")  # freezing again adds what accumulated since
    assert again["frozen"] >= counts["frozen"]
    cycle = []
    cycle.append(cycle)  # garbage made after the freeze is still collected
    del cycle
    assert gc.collect() >= 1


def test_pauses_are_timed_per_take_and_long_ones_logged(caplog):
    pauses = GcPauses(warn_s=0.0).install()
    try:
        pauses.install()  # idempotent
        assert gc.callbacks.count(pauses._callback) == 1
        pauses.take()
        with caplog.at_level(logging.WARNING, logger="megatron_vespo.utils.gc_control"):
            gc.collect()
        got = pauses.take()
        assert got["time/gc_s"] > 0 and 0 < got["time/gc_max_s"] <= got["time/gc_s"]
        assert "garbage collection of generation 2 took" in caplog.text
        assert pauses.take() == {"time/gc_s": 0.0, "time/gc_max_s": 0.0}  # reset by the take
    finally:
        pauses.remove()
    assert pauses._callback not in gc.callbacks
    gc.collect()
    assert pauses.take()["time/gc_s"] == 0.0  # removed: no longer timed
