"""The prediction duty cycle: which arm (predict or not) wins by measured decode step time."""

from __future__ import annotations

import pytest

from finemoe import Engine, SamplingParams
from finemoe.config import EngineConfig
from finemoe.duty import PredictionDuty
from finemoe.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(
    duty: PredictionDuty, clock: Clock, steps: int, cost: dict[bool, float], prefill_every: int = 0
) -> list[bool]:
    """Run `steps` iterations; an iteration predicting takes cost[True] seconds, else cost[False]."""
    arms = []
    for i in range(steps):
        prefill = prefill_every > 0 and i % prefill_every == 0
        arm = duty.predict(prefill)
        arms.append(arm)
        clock.t += cost[arm]
    return arms


def test_prediction_stops_when_it_lengthens_the_step_and_is_compared_again():
    clock = Clock()
    duty = PredictionDuty(block=2, pairs=2, exploit=10, clock=clock)
    arms = drive(duty, clock, 36, {True: 0.010, False: 0.005})
    # a comparison: 2 predicting, 2 not, twice; off is faster, so 10 off; then the next comparison
    T, F = True, False
    assert arms[:8] == [T, T, F, F, T, T, F, F] and arms[8:18] == [F] * 10
    assert arms[18:26] == [T, T, F, F, T, T, F, F] and arms[26:36] == [F] * 10
    assert duty.best is False and duty.switches == 1 and duty.comparisons == 2
    st = duty.stats()
    assert st["decode_step_ms_predicting"] == pytest.approx(10.0)
    assert st["decode_step_ms_not_predicting"] == pytest.approx(5.0)
    assert st["decode_iterations_predicting"] == 8 and st["decode_iterations_not_predicting"] == 28


def test_prediction_stays_when_it_pays_and_small_differences_do_not_switch():
    clock = Clock()
    duty = PredictionDuty(block=2, pairs=2, exploit=10, margin=0.03, clock=clock)
    arms = drive(duty, clock, 36, {True: 0.005, False: 0.010})
    assert duty.best is True and arms.count(False) == 8  # only in the two comparisons
    clock2 = Clock()
    duty2 = PredictionDuty(block=2, pairs=2, exploit=10, margin=0.03, clock=clock2)
    drive(duty2, clock2, 36, {True: 0.0100, False: 0.0099})  # 1% faster without: within the margin
    assert duty2.best is True and duty2.switches == 0


def test_a_settled_verdict_is_probed_less_often_and_a_switch_starts_over():
    clock = Clock()
    duty = PredictionDuty(block=2, pairs=1, exploit=4, max_exploit=16, clock=clock)
    cost = {True: 0.010, False: 0.005}
    arms = drive(duty, clock, 4 + 4 + 4 + 8 + 4 + 16 + 4 + 16, cost)
    # comparisons of 4 (T, T, F, F); exploit stretches 4 (the first), 8, 16, then capped at 16
    T, F = True, False
    probe = [T, T, F, F]
    assert arms == probe + [F] * 4 + probe + [F] * 8 + probe + [F] * 16 + probe + [F] * 16
    assert duty.switches == 1 and duty.stretch == 16
    # predicting becomes faster: the next comparison switches back and the stretch starts over
    cost = {True: 0.002, False: 0.005}
    arms = drive(duty, clock, 4 + 4, cost)
    assert arms == probe + [T] * 4 and duty.best is True and duty.switches == 2 and duty.stretch == 4
    with pytest.raises(ValueError):
        PredictionDuty(exploit=8, max_exploit=4)


def test_a_block_first_step_is_no_sample():
    """The step of an arm's first iteration in a block pays for the other arm's prefetches and
    cache state: it is left out. Here a switch costs 30 ms once; the medians see none of it."""
    clock = Clock()
    duty = PredictionDuty(block=3, pairs=2, exploit=5, clock=clock)
    prev = None
    for _ in range(12):
        arm = duty.predict(False)
        clock.t += (0.010 if arm else 0.005) + (0.030 if prev is not None and arm != prev else 0.0)
        prev = arm
    duty.predict(False)  # ends the comparison
    assert duty.median[True] == pytest.approx(0.010) and duty.median[False] == pytest.approx(0.005)


def test_a_phase_after_prefill_does_not_bias_the_comparison():
    """Steps right after a prefill are slower whatever the arm (the cache holds the prompt's
    experts): interleaved blocks see both arms in both phases, so the faster arm still wins."""
    clock = Clock()
    duty = PredictionDuty(block=2, pairs=3, exploit=20, clock=clock)
    for i in range(12):
        arm = duty.predict(i == 0)
        slow = 0.010 if i < 5 else 0.0  # the first decode steps are slow for either arm
        clock.t += (0.006 if arm else 0.007) + slow
    duty.predict(False)
    assert duty.best is True and duty.switches == 0


def test_prefill_always_predicts_and_its_gap_is_no_sample():
    clock = Clock()
    duty = PredictionDuty(block=2, pairs=1, exploit=5, clock=clock)
    arms = drive(duty, clock, 27, {True: 0.010, False: 0.005}, prefill_every=9)
    assert all(arms[i] for i in range(0, 27, 9))  # every prefill predicts
    # the step after a prefill is not measured: medians are exactly the per-arm costs
    assert duty.median[True] == pytest.approx(0.010) and duty.median[False] == pytest.approx(0.005)


def test_long_pauses_are_not_steps():
    clock = Clock()
    duty = PredictionDuty(block=3, pairs=1, exploit=5, clock=clock)
    cost = {True: 0.010, False: 0.020}
    drive(duty, clock, 3, cost)  # one step measured (the block's first is no sample)
    clock.t += 5.0  # an idle server in the comparison
    drive(duty, clock, 3, cost)  # the other arm's block; the pause is no sample
    clock.t += 5.0  # and another one
    drive(duty, clock, 2, cost)
    assert duty.median[True] == pytest.approx(0.010) and duty.median[False] == pytest.approx(0.020)
    assert duty.best is True


def test_duty_refuses_degenerate_schedules():
    with pytest.raises(ValueError, match="block"):
        PredictionDuty(block=1)


def test_config_refuses_an_unknown_mode():
    with pytest.raises(ConfigError, match="prediction_duty"):
        EngineConfig(prediction_duty="sometimes")


def test_adaptive_duty_in_the_engine_is_lossless_and_reported(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = [[5, 7, 9, 11, 13], [2, 4, 6, 8]]
    with Engine.from_pretrained(path, policy="finemoe", expert_budget="50%", progress=False) as eng:
        want = [o.token_ids for o in eng.generate(prompts, params)]
        assert eng.stats().extra["prediction_duty"] == "always"  # auto on a CPU: always predict
        maps = eng.maps.size
    with Engine.from_pretrained(
        path, policy="finemoe", expert_budget="50%", progress=False, prediction_duty="adaptive"
    ) as eng:
        eng.runtime.duty = PredictionDuty(block=4, pairs=2, exploit=12)
        got = [o.token_ids for o in eng.generate(prompts, params)]
        st = eng.stats().extra
        assert eng.maps.size == maps  # paused iterations are still recorded into the map store
    assert got == want
    assert st["prediction_duty"] == "adaptive"
    assert st["decode_iterations_predicting"] >= 8 and st["decode_iterations_not_predicting"] >= 8
    assert st["decode_step_ms_predicting"] > 0 and st["decode_step_ms_not_predicting"] > 0


def test_where_the_duty_applies():
    from finemoe.duty import duty_applies

    assert duty_applies("auto", "cuda", "auto", True, False)
    assert not duty_applies("auto", "cpu", "auto", True, False)  # a CPU always predicts
    assert duty_applies("adaptive", "cpu", "sync", True, False)
    assert not duty_applies("adaptive", "cuda", "process", True, False)  # thread/process always predict
    assert not duty_applies("adaptive", "cuda", "async", True, False)
    assert not duty_applies("always", "cuda", "auto", True, False)
    assert not duty_applies("adaptive", "cuda", "auto", False, False)  # a baseline preset
    assert not duty_applies("adaptive", "cuda", "auto", True, True)  # everything resident


def test_a_reconfigure_back_resumes_the_duty_of_that_configuration(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    with Engine.from_pretrained(
        path, policy="finemoe", expert_budget="50%", progress=False, prediction_duty="adaptive"
    ) as eng:
        first = eng.runtime.duty
        eng.generate([[5, 7, 9, 11, 13]], params)
        seen = dict(first.iterations)
        assert seen[True] + seen[False] == 29  # every decode iteration asked the duty
        eng.reconfigure(expert_budget="75%")  # another configuration: its own duty
        other = eng.runtime.duty
        assert other is not first and other.iterations == {True: 0, False: 0}
        eng.reconfigure(policy="lru")  # a baseline: no duty
        assert eng.runtime.duty is None
        eng.reconfigure(policy="finemoe", expert_budget="50%")
        assert eng.runtime.duty is first  # measurements carried over
        assert first.iterations == seen and first._last is None  # the pause is no sample
        out = eng.generate([[2, 4, 6, 8]], params)[0]
        assert sum(first.iterations.values()) == 58
        assert eng.stats().extra["decode_iterations_predicting"] == first.iterations[True]
    with Engine.from_pretrained(path, policy="finemoe", expert_budget="50%", progress=False) as ref:
        assert ref.generate([[2, 4, 6, 8]], params)[0].token_ids == out.token_ids  # still lossless
