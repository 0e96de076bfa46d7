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


def test_prediction_stops_when_it_lengthens_the_step_and_is_probed_again():
    clock = Clock()
    duty = PredictionDuty(first=4, probe=2, exploit=10, clock=clock)
    arms = drive(duty, clock, 40, {True: 0.010, False: 0.005})
    # 4 predicting, 2 probing without: off is faster, so 10 off, then a 2-iteration probe of on, ...
    assert arms[:4] == [True] * 4 and arms[4:6] == [False] * 2
    assert arms[6:16] == [False] * 10 and arms[16:18] == [True] * 2 and arms[18:28] == [False] * 10
    assert duty.best is False and duty.switches == 1
    st = duty.stats()
    assert st["decode_step_ms_predicting"] == pytest.approx(10.0) and st[
        "decode_step_ms_not_predicting"
    ] == pytest.approx(5.0)
    assert st["decode_iterations_predicting"] == 8 and st["decode_iterations_not_predicting"] == 32


def test_prediction_stays_when_it_pays_and_small_differences_do_not_switch():
    clock = Clock()
    duty = PredictionDuty(first=4, probe=2, exploit=10, margin=0.03, clock=clock)
    arms = drive(duty, clock, 28, {True: 0.005, False: 0.010})
    assert duty.best is True and arms.count(False) == 4  # only the probes (iterations 4-5 and 16-17)
    clock2 = Clock()
    duty2 = PredictionDuty(first=4, probe=2, exploit=10, margin=0.03, clock=clock2)
    drive(duty2, clock2, 34, {True: 0.0100, False: 0.0099})  # 1% faster without: within the margin
    assert duty2.best is True and duty2.switches == 0


def test_prefill_always_predicts_and_its_gap_is_no_sample():
    clock = Clock()
    duty = PredictionDuty(first=3, probe=2, exploit=5, clock=clock)
    arms = drive(duty, clock, 24, {True: 0.010, False: 0.005}, prefill_every=6)
    assert all(arms[i] for i in range(0, 24, 6))  # every prefill predicts
    # the step after a prefill is not measured: medians are exactly the per-arm costs
    assert duty.median[True] == pytest.approx(0.010) and duty.median[False] == pytest.approx(0.005)


def test_long_pauses_are_not_steps():
    clock = Clock()
    duty = PredictionDuty(first=2, probe=2, exploit=5, clock=clock)
    cost = {True: 0.010, False: 0.020}
    drive(duty, clock, 2, cost)  # one step measured
    clock.t += 5.0  # an idle server in the first stretch: no median of either arm yet
    drive(duty, clock, 2, cost)  # the stretch ends (2 gaps, one of them the pause); the probe starts
    clock.t += 5.0  # and a pause in the probe
    drive(duty, clock, 2, cost)
    assert duty.median[True] == pytest.approx(0.010) and duty.median[False] == pytest.approx(0.020)
    assert duty.best is True


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
        eng.runtime.duty.first, eng.runtime.duty.left, eng.runtime.duty.exploit = 8, 8, 12
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
