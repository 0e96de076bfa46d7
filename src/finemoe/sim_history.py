"""The stores a replay starts from (the paper's offline setup: the history split preloaded), filled
from a trace by the engine's own recorder (`HistoryRecorder`), one iteration at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finemoe.baselines import RequestMatrixStore
from finemoe.expert_map import ExpertMapStore, StoreGeometry
from finemoe.history import HistoryRecorder
from finemoe.predictor import PredictorDeps
from finemoe.replay_rows import iteration_tensors
from finemoe.trace import Trace
from finemoe.types import RoutingEvent


@dataclass
class History:
    """The history stores a replay starts from (the paper's offline setup: history preloaded)."""

    maps: ExpertMapStore
    requests: RequestMatrixStore

    def clone(self) -> History:
        maps = ExpertMapStore(self.maps.geometry, self.maps.capacity, self.maps.distance)
        st = self.maps.state()
        if st["emb"].shape[0]:
            maps.load_rows(st["emb"], st["maps"])
        req = RequestMatrixStore(self.maps.geometry.num_layers, self.maps.geometry.num_experts, self.requests.capacity)
        eams = self.requests.state()["eams"]
        if eams.shape[0]:
            req.load_rows(eams)
        return History(maps, req)


def empty_history(trace: Trace, capacity: int = 1000, distance: int = 3) -> History:
    spec = trace.spec
    geo = StoreGeometry(spec.num_layers, spec.num_experts, trace.identity.embedding_dim)
    return History(
        ExpertMapStore(geo, capacity, distance), RequestMatrixStore(spec.num_layers, spec.num_experts, capacity)
    )


def record_history(
    trace: Trace, history: History, store_rows: str = "all", map_values: str = "probs", progress: Callable | None = None
) -> None:
    """Insert `trace`'s iterations into the stores, as the engine's online recorder does."""
    deps = PredictorDeps(
        trace.spec, history.maps.distance, history.maps, history.requests, store_rows=store_rows, map_values=map_values
    )
    rec = HistoryRecorder(deps)
    g = 0
    for r in range(trace.num_requests):
        for it in range(int(trace.output_len[r])):
            a, b = trace.rows(r, it)
            _replay_iteration(trace, rec, g, it == 0, [(r, a, b)])
            g += 1
        rec.end_requests()
        if progress is not None:
            progress(r + 1, trace.num_requests)


def _replay_iteration(trace: Trace, pred: Any, g: int, prefill: bool, parts: list[tuple[int, int, int]]) -> None:
    """Feed one iteration's context and routing to a bare predictor (no cache)."""
    ctx, probs, topk, _ = iteration_tensors(trace, g, prefill, parts)
    pred.on_iteration_start(ctx)
    for layer in range(trace.spec.num_layers):
        pred.on_routing(RoutingEvent(g, layer, probs[layer], topk[layer], prefill))
