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

Schedule (decode iterations; prefill always predicts): a *comparison* alternates the arms in
blocks of `block` iterations (predicting first), `pairs` blocks of each; then the faster arm (by
the median step of the comparison's samples) runs for `exploit` iterations; then another
comparison, and so on. Interleaving matters: decode steps right after a prefill are slower (the
cache still holds the prompt's experts), and a stretch of one arm followed by a stretch of the
other compares two phases, not two arms (seen on the H200, session 10). The first step of a block
is no sample (it pays for the previous block's arm). The exploited arm changes only when the
other's median is at least `margin` lower. Each comparison that keeps the arm doubles the next
exploit stretch (up to `max_exploit`: a settled verdict costs fewer probing steps); a switch
starts again from `exploit`. A gap between iterations much longer than a step (a
new request, a prefill, an idle server) is no sample either. Deterministic given the clock
(tests pass a fake one).
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
    return adaptive and search in ("auto", "sync", "device") and preset_allows and not all_resident


class PredictionDuty:
    def __init__(
        self,
        block: int = 4,
        pairs: int = 3,
        exploit: int = 128,
        margin: float = 0.03,
        clock: Callable[[], float] = time.perf_counter,
        max_exploit: int = 1024,
    ) -> None:
        if block < 2 or pairs < 1 or exploit < 1 or max_exploit < exploit:
            raise ValueError("the duty needs block >= 2, pairs >= 1 and 1 <= exploit <= max_exploit")
        self.block, self.pairs, self.exploit, self.margin, self.clock = block, pairs, exploit, margin, clock
        self.max_exploit = max_exploit
        self.stretch = exploit  # iterations of the current (or next) exploit phase
        self.best = True  # the arm exploited: predict (True) or not
        self._comparing = True  # the phase is a comparison (else: exploiting `best`)
        self._plan = self._comparison()  # the arms of the iterations still to run, last first
        self.median: dict[bool, float | None] = {True: None, False: None}  # seconds per decode step
        self._samples: dict[bool, list[float]] = {True: [], False: []}  # this comparison's step times
        self._last: float | None = None  # start time of the previous decode iteration
        self._last_arm: bool | None = None  # the arm the previous decode iteration ran
        self._fresh = True  # the previous decode iteration was the first of its block
        self.iterations = {True: 0, False: 0}
        self.switches = 0
        self.comparisons = 0

    def _comparison(self) -> list[bool]:
        """The arms of one comparison, last first (popped): blocks alternating predict / not,
        `pairs` of each, predicting first."""
        return [arm for _ in range(self.pairs) for arm in (False, True) for _ in range(self.block)]

    def predict(self, is_prefill: bool) -> bool:
        """Called at every iteration start: True if the planning predictors run in it."""
        now = self.clock()
        if is_prefill:
            self._last = None  # the next decode step would count the prefill: no sample
            return True
        last, self._last = self._last, now
        if last is not None and self._comparing and not self._fresh and self._last_arm is not None:
            gap = now - last  # the previous decode iteration's step, with its arm
            ref = self.median[self._last_arm] or self.median[not self._last_arm] or self._typical()
            if ref is None or gap < 10 * ref:  # longer: a pause between requests, not a step
                self._samples[self._last_arm].append(gap)
        if not self._plan:
            self._end_phase()
        arm = self._plan.pop()
        self._fresh = arm != self._last_arm
        self._last_arm = arm
        self.iterations[arm] += 1
        return arm

    def resume(self) -> None:
        """Continue after a pause in which no iteration ran (the engine was reconfigured and set
        back up): the measurements and the phase stay, the time since the last step is no sample."""
        self._last, self._last_arm, self._fresh = None, None, True

    def _typical(self) -> float | None:
        seen = self._samples[True] + self._samples[False]
        return min(seen) if seen else None

    def _end_phase(self) -> None:
        if self._comparing:
            self.comparisons += 1
            for arm in (True, False):
                if self._samples[arm]:
                    self.median[arm] = statistics.median(self._samples[arm])
            self._samples = {True: [], False: []}
            mine, other = self.median[self.best], self.median[not self.best]
            if mine is not None and other is not None and other < mine * (1 - self.margin):
                self.best = not self.best
                self.switches += 1
                self.stretch = self.exploit
            elif self.comparisons > 1:  # the verdict held again: probe half as often
                self.stretch = min(2 * self.stretch, self.max_exploit)
            self._comparing, self._plan = False, [self.best] * self.stretch
        else:
            self._comparing, self._plan = True, self._comparison()

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
            "prediction_comparisons": self.comparisons,
            "prediction_exploit_stretch": self.stretch,
        }
