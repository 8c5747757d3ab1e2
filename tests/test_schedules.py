import pytest

from prunekit.errors import PrunekitError
from prunekit.schedules import StepSchedule, imp_rounds, stage_sparsities


@pytest.mark.parametrize("shape", ["cubic", "linear", "exponential"])
def test_step_schedule_rises_monotonically_and_hits_target_exactly_at_end(shape):
    schedule = StepSchedule(0.95, start=10, end=110, shape=shape)
    values = [schedule(t) for t in range(0, 200)]
    assert values[0] == 0 and values[10] == 0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[110] == 0.95 and values[-1] == 0.95 and values[109] < 0.95


def test_cubic_is_zhu_and_gupta():
    schedule = StepSchedule(0.9, start=0, end=100, initial=0.5)
    assert schedule(50) == pytest.approx(0.9 + (0.5 - 0.9) * (1 - 0.5) ** 3)


def test_constant_is_one_shot_at_start():
    schedule = StepSchedule(0.8, start=5, end=5, shape="constant")
    assert schedule(4) == 0 and schedule(5) == 0.8


@pytest.mark.parametrize("kind", ["linear", "cubic", "exponential", "geometric"])
def test_stage_schedules_end_at_target_and_rise(kind):
    values = stage_sparsities(0.98, 8, kind, base=0.1)
    assert len(values) == 8 and values[-1] == 0.98
    assert all(b > a for a, b in zip(values, values[1:]))


def test_exponential_stages_follow_chita_formula():
    values = stage_sparsities(0.9, 4, "exponential", base=0.1)
    assert values[1] == pytest.approx(0.1 + 0.8 * 0.5 / (1 - 2 ** -3))


def test_imp_rounds_geometric():
    rounds = imp_rounds(0.9)
    assert rounds[:3] == pytest.approx([0.2, 0.36, 0.488])
    assert rounds[-1] == 0.9 and len(rounds) == 11


def test_bad_schedules_are_refused():
    with pytest.raises(PrunekitError, match="end after it starts"):
        StepSchedule(0.9, start=10, end=5)
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        StepSchedule(1.0, start=0, end=5)
    with pytest.raises(PrunekitError, match="at least 1"):
        stage_sparsities(0.9, 0)
    with pytest.raises(PrunekitError, match="above the target"):
        stage_sparsities(0.5, 3, base=0.7)
