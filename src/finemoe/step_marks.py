"""GPU-side times of replayed decode steps: a measurement probe, off unless asked for.

Host marks (`OffloadRuntime.sync_marks_s`, `step_spans_s`) say when the host did something, not
when the GPU got there. This probe records up to five timing events per replayed step: on the
compute stream before S_0's launch (`start`), after the launch of the segment that ends with the
last router (`routed`), before and after the step's last segment's launch (`end`), and on the side
stream after the step's last side graph. `summary()` (a device sync; call it
between runs) turns them into per-step medians, in microseconds:

- `idle`: the last step's end to this step's start on the stream (the GPU idles on the host's
  logits read, sampling and next launch, and on the wait for the last step's side graphs,
  `side_after_end`; only steps that follow a step of the same request);
- `to_router`: start to the last router's end (every segment but the last; the GPU's own pace,
  plus any wait for the host inside the step);
- `tail`: the last router's end to the step's end (the host's routing read and last launch, then
  the last segment);
- `to_last_launch`: the last router's end to the point of the stream where the last segment's
  launch begins (the host's routing read and serve, and whatever the serve made the stream wait for);
- `side_after_end`: the step's end to the end of its side graphs (`side_graphs`; an event recorded
  on the side stream after the step's last side launch), negative when they ended first; only
  steps that launched side graphs. The next step's S_0 waits for them.
- `to_fed`: the step's end to the point of the stream where the host feeds the next token
  (`StaticDecoder.feed`, before its write of the token): the logits read and sampled, the host's
  arrival there on the GPU's clock (the stream is idle by then); `idle` minus it is the host's way from
  the token to the next S_0 launch. Only steps followed by a fed token.
"""

from __future__ import annotations

import statistics

import torch

SPANS = ("idle", "to_router", "tail", "to_last_launch", "side_after_end", "to_fed")


class StepMarks:
    """Timing events of replayed steps on one compute stream, kept until `summary()`. With one MoE
    layer the last router's segment is S_0 itself: only `idle` and `to_fed` are measured."""

    def __init__(self) -> None:
        # per step: start, routed, end, sides' end, before the last launch, the next token fed
        self._steps: list[list[torch.cuda.Event | None]] = []
        self._follows: list[bool] = []  # the step follows the one before it in the same request
        self._open = False

    def start(self, stream: torch.cuda.Stream, follows: bool) -> None:
        """A replayed step begins: S_0 is launched next on `stream`."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        self._steps.append([ev, None, None, None, None, None])
        self._follows.append(follows and self._open)
        self._open = True

    def mark(self, slot: int, stream: torch.cuda.Stream) -> None:
        """The current step's `routed` (slot 1), `end` (2), sides' end (3), before-the-last-launch (4)
        or next-token-fed (5) event, on `stream`."""
        if not self._steps:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        self._steps[-1][slot] = ev

    def cut(self) -> None:
        """A request ended (the next prefill): the next step does not follow this one."""
        self._open = False

    def summary(self) -> dict[str, float]:
        """Median microseconds of each span over the steps recorded since the last summary
        (empty spans: 0.0); clears the record."""
        steps, follows = self._steps, self._follows
        self._steps, self._follows, self._open = [], [], False
        if steps:
            torch.cuda.synchronize()
        spans: dict[str, list[float]] = {name: [] for name in SPANS}
        for i, (start, routed, end, sides, last, fed) in enumerate(steps):
            if i and follows[i] and steps[i - 1][2] is not None:
                spans["idle"].append(steps[i - 1][2].elapsed_time(start) * 1e3)  # type: ignore[union-attr]
            if routed is not None:
                spans["to_router"].append(start.elapsed_time(routed) * 1e3)  # type: ignore[union-attr]
                if end is not None:
                    spans["tail"].append(routed.elapsed_time(end) * 1e3)
            if routed is not None and last is not None:
                spans["to_last_launch"].append(routed.elapsed_time(last) * 1e3)
            if end is not None and sides is not None:
                spans["side_after_end"].append(end.elapsed_time(sides) * 1e3)
            if end is not None and fed is not None:
                spans["to_fed"].append(end.elapsed_time(fed) * 1e3)
        return {name: statistics.median(v) if v else 0.0 for name, v in spans.items()}
