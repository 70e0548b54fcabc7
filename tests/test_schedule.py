import math

import pytest

from megareuse.config import ScheduleConfig
from megareuse.engine.schedule import LRSchedule


def test_warmup_is_linear_to_peak():
    s = LRSchedule("cosine", lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_closed_form():
    s = LRSchedule("cosine", lr=2.0, total_steps=101, warmup_steps=1, min_lr_ratio=0.25)
    for step in (1, 26, 51, 76, 100):
        progress = (step - 1) / 99
        expected = 0.5 + 0.5 * (2.0 - 0.5) * (1 + math.cos(math.pi * progress))
        assert s(step) == pytest.approx(expected)
    assert s(100) == pytest.approx(0.5)


def test_constant():
    s = LRSchedule("constant", lr=3.0, total_steps=50, warmup_steps=5)
    assert all(s(i) == 3.0 for i in range(5, 50))


def test_wsd_stable_then_linear_decay():
    s = LRSchedule("wsd", lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_frac=0.2)
    assert s.decay_start == 80
    assert all(s(i) == 1.0 for i in range(10, 81))
    assert s(99) == pytest.approx(0.0)
    assert s(90) == pytest.approx(1.0 - 10 / 19)
    diffs = [s(i) - s(i + 1) for i in range(80, 99)]
    assert max(diffs) == pytest.approx(min(diffs))


def test_from_config_clamps_warmup_and_rejects_bad_kind():
    s = LRSchedule.from_config(ScheduleConfig(warmup_steps=50), lr=1.0, total_steps=10)
    assert s.warmup_steps == 9 and s(8) == pytest.approx(1.0) and s(9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="accepted one of cosine, constant, wsd"):
        LRSchedule("step", 1.0, 10, 0)
