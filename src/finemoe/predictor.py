"""Predictors decide which experts to prefetch. Plain Python and CPU torch over small values: no
CUDA calls, no transformers import, logical steps only, so the same objects drive the engine and
the simulator.

This module holds the protocol, what every predictor may be given (`PredictorDeps`), the δ
selection rule, the simple predictors and the registry. The FineMoE predictor lives in
`fine_predictor`, the paper's baselines in `baselines`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.types import ExpertId, IterationContext, MoESpec, PrefetchPlan, PrefetchRequest, RoutingEvent

# (target MoE layer, router input [T, H] on the device) -> router probabilities [T, E] on the CPU
# (a tensor, or a NumPy array: the simulator's recorded tables)
GateFn = Callable[[int, torch.Tensor], torch.Tensor | np.ndarray | None]  # None: no speculation for that layer

DELTA_RULES = ("paper", "demo", "topk")  # topk: exactly k experts, no δ (the ablation)
# Cumulative probabilities within this of δ count as reaching it, so float32 (tensor) and float64
# (single-row) sums select the same experts.
TIE_EPS = 1e-6


class Predictor(Protocol):
    name: str

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None: ...

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None: ...

    def end_requests(self) -> None:
        """The sequences of the current batch are finished (request-level state may be committed)."""
        ...

    def stats(self) -> dict[str, Any]: ...


def reads_router_probs(predictor: Any) -> bool:
    """Whether `predictor.on_routing` may read `event.probs` in a graphed decode step: its
    `graphed_reads_probs` (True when it does not say), any member's for a chain. A graphed step
    copies a router's logits to the host only when one of the layer's readers may
    (`execution.LayerBinding.on_router`)."""
    members = getattr(predictor, "members", None)
    if members is not None:
        return any(reads_router_probs(m) for m in members)
    return bool(getattr(predictor, "graphed_reads_probs", True))


@dataclass
class PredictorDeps:
    """What a predictor may use. `maps` / `requests` are the engine's history stores (they outlive
    predictors), `gate` runs a later layer's router on an earlier hidden state (speculative
    baselines)."""

    spec: MoESpec
    distance: int
    maps: Any = None  # expert_map.ExpertMapStore
    requests: Any = None  # baselines.RequestMatrixStore
    gate: GateFn | None = None
    delta_rule: str = "paper"
    trajectory_window: int = 0  # 0: the whole prefix (paper); w: only the latest w layers
    trajectory_candidates: int = 64  # 0: every stored map at every layer (paper); K: the K leading ones later on
    trajectory_lag: int = 0  # batch-1 decode: plan target m + d from the trajectory through m - lag (0 or 1)
    map_min_score: float = 0.0  # plans only from matches scoring at least this (cosine); 0: every match
    map_min_precision: float = 0.0  # withhold map plans while their measured precision is below this; 0: never
    store_rows: str = "all"  # which prefill tokens become store rows: "all" or "last" (per prompt)
    semantic: bool = True  # FineMoE: plan the first d layers from the semantic match (False: the ablation)
    map_values: str = "probs"  # what a map row holds: router "probs" (paper) or top-k "counts" (hit count)
    prefill_plans: str = "maps"  # finemoe in prefill: "maps", "gate" (maps sit prefill out) or "none" (gate too)
    layer_probs: bool = True  # plans carry per-layer probabilities (False: the eviction policy ignores them)


MAP_VALUES = ("probs", "counts")


def routing_rows(event: RoutingEvent, rows: torch.Tensor, values: str) -> torch.Tensor:
    """The map rows [N, E] of an event for the token rows `rows` [N]: the router probabilities, or
    (values "counts") each token's top-k selection as 1/k per selected expert."""
    if values == "probs":
        return event.host_probs()[rows].float()
    ids = event.topk_ids[rows]  # [N, k]
    out = torch.zeros(ids.shape[0], event.probs.shape[-1])
    return out.scatter_(1, ids, 1.0 / ids.shape[1])


def select_by_delta(probs: torch.Tensor, scores: torch.Tensor, top_k: int, rule: str = "paper") -> torch.Tensor:
    """Similarity-aware expert selection (spec §3.5): mask [N, E] of experts to prefetch.

    `probs` [N, E] are the matched maps' probabilities for one layer, `scores` [N] the match
    cosines. δ = clip(1 - score, 0, 1); experts are taken by descending probability until the
    cumulative probability reaches δ ("paper": the expert that crosses δ is included; "demo": the
    authors' demo, cumsum <= δ, may take one fewer), never fewer than `top_k`, never more than E.
    """
    n, e = probs.shape
    delta = (1.0 - scores.float()).clamp(0.0, 1.0).unsqueeze(1)  # [N, 1]
    sorted_p, order = torch.sort(probs.float(), dim=1, descending=True)
    cum = sorted_p.cumsum(dim=1)
    if rule == "paper":
        count = (cum < delta - TIE_EPS).sum(dim=1) + 1
    elif rule == "demo":
        count = (cum <= delta + TIE_EPS).sum(dim=1)
    elif rule == "topk":
        count = torch.zeros(n, dtype=torch.int64)
    else:
        raise ConfigError(f"unknown delta rule {rule!r}; choose one of {', '.join(DELTA_RULES)}")
    count = count.clamp(min=min(top_k, e), max=e)  # [N]
    take_sorted = torch.arange(e).unsqueeze(0) < count.unsqueeze(1)  # [N, E] in sorted order
    mask = torch.zeros(n, e, dtype=torch.bool)
    mask.scatter_(1, order, take_sorted)
    return mask


def select_one(probs: np.ndarray | list[float], score: float, top_k: int, rule: str = "paper") -> dict[int, float]:
    """`select_by_delta` for one row [E] (NumPy, no tensor ops): {expert: p} of the selected
    experts; ties keep the lower expert id first."""
    p = np.asarray(probs, dtype=np.float64)
    e = p.shape[0]
    order = np.argsort(-p, kind="stable")
    if rule == "topk":
        count = min(top_k, e)
    else:
        delta = min(max(1.0 - score, 0.0), 1.0)
        cum = np.cumsum(p[order])  # non-decreasing: counting matches stopping at the first miss
        if rule == "paper":
            count = int(np.count_nonzero(cum < delta - TIE_EPS)) + 1
        elif rule == "demo":
            count = int(np.count_nonzero(cum <= delta + TIE_EPS))
        else:
            raise ConfigError(f"unknown delta rule {rule!r}; choose one of {', '.join(DELTA_RULES)}")
        count = min(max(count, min(top_k, e)), e)
    take = order[:count]
    return dict(zip(take.tolist(), p[take].tolist(), strict=True))


class RankedRow:
    """One map row [E] ranked for δ selection (`ranked_row`): `order` the expert ids by descending
    probability, ties to the lower id; `probs` theirs; `cum` the running sums (float64, as
    `select_one` computes them). What decode derives from a matched row again and again (each
    expert's rank, the row as prefetch requests) is kept with it."""

    __slots__ = ("order", "probs", "cum", "_rank", "_requests")

    def __init__(self, order: list[int], probs: list[float], cum: list[float]) -> None:
        self.order, self.probs, self.cum = order, probs, cum
        self._rank: list[int] | None = None
        self._requests: dict[tuple[int, int], tuple[PrefetchRequest, ...]] = {}

    def count(self, score: float, top_k: int, rule: str = "paper") -> int:
        """How many of the leading experts δ selection takes (`select_one`'s count): the running
        sums are non-decreasing, so counting those below δ is a bisection."""
        e = len(self.order)
        if rule == "topk":
            return min(top_k, e)
        delta = 1.0 - score  # clipped to [0, 1] (compares, not min/max calls: a per-layer cost)
        if delta < 0.0:
            delta = 0.0
        elif delta > 1.0:
            delta = 1.0
        if rule == "paper":
            count = bisect.bisect_left(self.cum, delta - TIE_EPS) + 1
        elif rule == "demo":
            count = bisect.bisect_right(self.cum, delta + TIE_EPS)
        else:
            raise ConfigError(f"unknown delta rule {rule!r}; choose one of {', '.join(DELTA_RULES)}")
        floor = top_k if top_k < e else e  # at least the top k (of e)
        if count < floor:
            return floor
        return count if count < e else e

    def rank(self) -> list[int]:
        """[E]: each expert's position in `order` (so `rank[e] < count` iff e is selected)."""
        if self._rank is None:
            rank = [0] * len(self.order)
            for i, e in enumerate(self.order):
                rank[e] = i
            self._rank = rank
        return self._rank

    def requests(
        self, layer: int, dist: int, count: int, eids: list[ExpertId] | None = None
    ) -> tuple[PrefetchRequest, ...]:
        """The first `count` experts of the row as requests for `layer`, priority p / `dist` (spec
        §3.6), as `plan_for_layer` makes them for a selection of `count`. The longest prefix asked
        for is kept. `eids` [E]: the layer's `ExpertId`s, if the caller keeps them (fewer objects made)."""
        key = (layer, dist)
        reqs = self._requests.get(key, ())
        if len(reqs) < count:
            ids = eids if eids is not None else [ExpertId(layer, e) for e in range(len(self.order))]
            new = tuple.__new__  # PrefetchRequest's own constructor, without its Python frame
            reqs = self._requests[key] = reqs + tuple(
                [
                    new(PrefetchRequest, (ids[e], p / dist))
                    for e, p in zip(self.order[len(reqs) : count], self.probs[len(reqs) : count], strict=True)
                ]
            )
        return reqs[:count]


def ranked_row(probs: np.ndarray) -> RankedRow:
    """One map row [E] ranked for δ selection (`RankedRow`)."""
    p = np.asarray(probs, dtype=np.float64).tolist()  # plain floats: E is small, list ops beat array ops
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)  # stable: ties keep the lower id first
    sp = list(map(p.__getitem__, order))
    return RankedRow(order, sp, list(itertools.accumulate(sp)))  # running sums in order, as np.cumsum adds them


def select_ranked(ranked: RankedRow, score: float, top_k: int, rule: str = "paper") -> dict[int, float]:
    """`select_one` on a row already ranked by `ranked_row` (the same experts, no array ops)."""
    count = ranked.count(score, top_k, rule)
    return dict(zip(ranked.order[:count], ranked.probs[:count], strict=True))


def merge_rows(probs: torch.Tensor, mask: torch.Tensor) -> dict[int, float]:
    """Batch merge (spec §3.10): union of the rows' selected experts, each with its highest
    probability over the rows that selected it. `probs`, `mask` [N, E] -> {expert: p}."""
    chosen = mask.any(dim=0)
    best = torch.where(mask, probs.float(), torch.zeros_like(probs, dtype=torch.float32)).amax(dim=0)
    return {int(e): float(best[e]) for e in torch.nonzero(chosen).view(-1).tolist()}


def plan_for_layer(target: int, layer_now: int, chosen: dict[int, float]) -> list[PrefetchRequest]:
    """Requests with the paper's priority p / (l - l_now) (spec §3.6); `layer_now` -1 before layer 0."""
    dist = max(target - layer_now, 1)
    return [PrefetchRequest(ExpertId(target, e), p / dist) for e, p in chosen.items()]


class NonePredictor:
    """Never prefetches: every miss is loaded on demand."""

    name = "none"
    graphed_reads_probs = False

    def __init__(self, deps: PredictorDeps) -> None:
        pass

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        return None

    def end_requests(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class PreviousTokenPredictor:
    """After layer l routes, prefetch for layer l+d the experts that layer used in its most recent
    iteration (wrapping into the next iteration's first layers). Priority falls with distance."""

    name = "previous-token"
    graphed_reads_probs = False  # the routed ids only

    def __init__(self, deps: PredictorDeps) -> None:
        self.num_layers = deps.spec.num_layers
        self.distance = deps.distance
        self.last: list[list[int]] = [[] for _ in range(self.num_layers)]

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        reqs = [
            PrefetchRequest(ExpertId(layer, e), 1.0 / (layer + 1))
            for layer in range(min(self.distance, self.num_layers))
            for e in self.last[layer]
        ]
        return PrefetchPlan(tuple(reqs), replace=True, iteration=ctx.iteration) if reqs else None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        self.last[event.layer] = sorted(set(event.topk_ids.view(-1).tolist()))
        target = event.layer + self.distance
        if target >= self.num_layers:
            return None  # the next iteration's start plans the first layers
        reqs = tuple(PrefetchRequest(ExpertId(target, e), 1.0 / self.distance) for e in self.last[target])
        return PrefetchPlan(reqs, iteration=event.iteration) if reqs else None

    def end_requests(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


def make_predictor(name: str, deps: PredictorDeps) -> Predictor:
    from finemoe.baselines import MoEInfinityPredictor, SpeculativeGatePredictor
    from finemoe.fine_predictor import FineMoEPredictor

    table: dict[str, Callable[[PredictorDeps], Predictor]] = {
        "none": NonePredictor,
        "previous-token": PreviousTokenPredictor,
        "finemoe": FineMoEPredictor,
        "speculative-gate": SpeculativeGatePredictor,
        "moe-infinity": MoEInfinityPredictor,
    }
    try:
        return table[name](deps)
    except KeyError:
        raise ConfigError(f"unknown predictor {name!r}; choose one of: {', '.join(table)}") from None
