"""ScheduledGC: automatic collection off while training, full collections on the schedule."""

import gc

import pytest

from deepseek_moe.config.train import TrainerConfig
from deepseek_moe.train.gc_control import ScheduledGC


@pytest.fixture
def collections(monkeypatch):
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
    yield calls
    gc.unfreeze()
    gc.enable()


def test_schedule_freezes_disables_collects_and_restores(collections):
    sched = ScheduledGC(every=3)
    sched.start()
    assert not gc.isenabled() and gc.get_freeze_count() > 0
    collections.clear()
    for step in range(1, 10):
        sched.after_step(step)
    assert len(collections) == 3  # steps 3, 6, 9
    sched.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_cycles_created_during_training_are_reclaimed(collections):
    class Node:
        pass

    sched = ScheduledGC(every=1)
    sched.start()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the collector frees it
    del a, b
    assert any(type(o) is Node for o in gc.get_objects())
    sched.after_step(1)
    assert not any(type(o) is Node for o in gc.get_objects())
    sched.stop()


def test_zero_leaves_automatic_gc_alone(collections):
    sched = ScheduledGC(every=0)
    sched.start()
    sched.after_step(0)
    assert gc.isenabled() and gc.get_freeze_count() == 0 and collections == []
    sched.stop()
    assert gc.isenabled()


def test_negative_interval_is_a_config_error():
    with pytest.raises(ValueError, match="trainer.gc_every"):
        TrainerConfig(gc_every=-1)
