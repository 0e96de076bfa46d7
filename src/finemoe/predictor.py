"""Predictors decide which experts to prefetch. Plain Python over small values: no CUDA calls, no
transformers import, logical steps only. The FineMoE predictor and the paper's baselines live here
too once they exist; this module ships the `none` predictor and a simple reuse predictor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from finemoe.types import ExpertId, MoESpec, PrefetchPlan, PrefetchRequest, RoutingEvent


class Predictor(Protocol):
    name: str

    def on_iteration_start(self, iteration: int, is_prefill: bool) -> PrefetchPlan | None: ...

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None: ...


class NonePredictor:
    """Never prefetches: every miss is loaded on demand."""

    name = "none"

    def __init__(self, spec: MoESpec, distance: int = 1) -> None:
        pass

    def on_iteration_start(self, iteration: int, is_prefill: bool) -> PrefetchPlan | None:
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        return None


class PreviousTokenPredictor:
    """After layer l routes, prefetch for layer l+d the experts that layer used in its most recent
    iteration (wrapping into the next iteration's first layers). Priority falls with distance."""

    name = "previous-token"

    def __init__(self, spec: MoESpec, distance: int = 1) -> None:
        self.num_layers = spec.num_layers
        self.distance = distance
        self.last: list[list[int]] = [[] for _ in range(spec.num_layers)]

    def on_iteration_start(self, iteration: int, is_prefill: bool) -> PrefetchPlan | None:
        reqs = [
            PrefetchRequest(ExpertId(layer, e), 1.0 / (layer + 1))
            for layer in range(min(self.distance, self.num_layers))
            for e in self.last[layer]
        ]
        return PrefetchPlan(tuple(reqs), replace=True) if reqs else None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        self.last[event.layer] = sorted(set(event.topk_ids.view(-1).tolist()))
        target = event.layer + self.distance
        if target >= self.num_layers:
            return None  # the next iteration's start plans the first layers
        reqs = tuple(PrefetchRequest(ExpertId(target, e), 1.0 / self.distance) for e in self.last[target])
        return PrefetchPlan(reqs) if reqs else None


PREDICTORS: dict[str, Callable[[MoESpec, int], Predictor]] = {
    "none": NonePredictor,
    "previous-token": PreviousTokenPredictor,
}
