"""Whether prediction pays: an explore-exploit choice, per decode iteration, between running the
planning predictors and not (policy; the engine only asks `predict()` and skips its predictor
calls when told no).

Why: when the host is the bottleneck (batch-1 decode of the Qwen shapes on the H200: ~1.7 ms of
host work per layer against a 0.35 ms expert copy, docs/results/gpu_trace.md), on-demand copies
already hide behind the host's own work, and every microsecond a predictor spends on the forward
thread lengthens the step. When the link is the bottleneck (Mixtral's 6.5 ms copies), prefetching
wins. The right choice depends on the machine, the model and the budget, so it is measured: the
decode step time (wall seconds from one decode iteration's start to the next, which counts the
predictor's host work and every stall it saves or causes) of each arm.

Schedule (decode iterations; prefill always predicts): `first` iterations predicting, then `probe`
without, then the faster arm (by median step) for `exploit` iterations, then `probe` of the other
arm, and so on. The arm changes only when the other's median is at least `margin` lower. A gap
between iterations much longer than a step (a new request, a prefill, an idle server) is not a
sample. Deterministic given the clock (tests pass a fake one).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def duty_applies(mode: str, device_type: str, search: str, preset_allows: bool, all_resident: bool) -> bool:
    """Whether an engine runs the adaptive duty: `prediction_duty` `mode` "adaptive", or "auto" on
    a CUDA device; inline search only (the searcher thread and process always predict); a preset
    that allows it (the finemoe ones; the paper's baselines stay as published); something to plan."""
    adaptive = mode == "adaptive" or (mode == "auto" and device_type == "cuda")
    return adaptive and search in ("auto", "sync") and preset_allows and not all_resident


class PredictionDuty:
    def __init__(
        self,
        first: int = 16,
        probe: int = 8,
        exploit: int = 128,
        margin: float = 0.03,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.first, self.probe, self.exploit, self.margin, self.clock = first, probe, exploit, margin, clock
        self.best = True  # the arm exploited: predict (True) or not
        self.arm = True  # the arm of the current stretch
        self.left = first  # decode iterations left in the current stretch
        self.median: dict[bool, float | None] = {True: None, False: None}  # seconds per decode step
        self._samples: list[float] = []  # step times of the current stretch
        self._last: float | None = None  # start time of the previous decode iteration
        self._probing = False  # the current stretch measures the arm not exploited
        self.iterations = {True: 0, False: 0}
        self.switches = 0

    def predict(self, is_prefill: bool) -> bool:
        """Called at every iteration start: True if the planning predictors run in it."""
        now = self.clock()
        if is_prefill:
            self._last = None  # the next decode step would count the prefill: no sample
            return True
        last, self._last = self._last, now
        if last is not None:  # the previous decode iteration ran the current arm
            gap = now - last
            ref = self.median[self.arm] or self.median[not self.arm] or (min(self._samples) if self._samples else None)
            if ref is None or gap < 10 * ref:  # longer: a pause between requests, not a step
                self._samples.append(gap)
        if self.left <= 0:
            self._end_stretch()
        self.left -= 1
        self.iterations[self.arm] += 1
        return self.arm

    def _end_stretch(self) -> None:
        if self._samples:
            self.median[self.arm] = statistics.median(self._samples)
        self._samples = []
        mine, other = self.median[self.best], self.median[not self.best]
        if mine is not None and other is not None and other < mine * (1 - self.margin):
            self.best = not self.best
            self.switches += 1
        if self._probing:  # back to the faster arm
            self.arm, self.left, self._probing = self.best, self.exploit, False
        else:  # measure the other arm again
            self.arm, self.left, self._probing = not self.best, self.probe, True

    def stats(self) -> dict[str, Any]:
        on, off = self.median[True], self.median[False]
        return {
            "prediction_duty": "adaptive",
            "prediction_on": self.best,
            "decode_step_ms_predicting": on * 1e3 if on is not None else None,
            "decode_step_ms_not_predicting": off * 1e3 if off is not None else None,
            "decode_iterations_predicting": self.iterations[True],
            "decode_iterations_not_predicting": self.iterations[False],
            "prediction_switches": self.switches,
        }
