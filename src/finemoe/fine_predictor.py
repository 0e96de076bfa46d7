"""The FineMoE predictor (spec §3.3-3.6, §3.9-3.10): expert maps matched by semantics for the
first d layers of an iteration and by the routing trajectory, refined after every layer, for the
rest; δ-sized selections; priority p / (l - l_now); batch plans merged by union and max.

Granularity (spec §6.2 #2-#4): one query row per real token of the iteration. In decode that is
each sequence's new token; in prefill every prompt token is its own row (semantic and trajectory
matches per token, plans merged over the tokens like a batch); `history.HistoryRecorder` makes
every row a store row when the iteration's last layer has routed (online mode).
"""

from __future__ import annotations

from typing import Any

import torch

from finemoe.expert_map import ExpertMapStore, TrajectoryQuery
from finemoe.predictor import PredictorDeps, merge_rows, plan_for_layer, select_by_delta
from finemoe.types import IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent


class FineMoEPredictor:
    name = "finemoe"

    def __init__(self, deps: PredictorDeps) -> None:
        if deps.maps is None:
            raise ValueError("the finemoe predictor needs an expert map store")
        self.spec, self.store = deps.spec, deps.maps
        self.store: ExpertMapStore
        self.distance = deps.distance
        self.rule = deps.delta_rule
        self.ctx: IterationContext | None = None
        self.traj: TrajectoryQuery | None = None
        self.layer_probs: list[torch.Tensor] = []  # [N, E] per layer routed so far
        self.sem_sum = self.sem_n = 0.0
        self.traj_sum = self.traj_n = 0.0
        self.plans = 0

    # -- events ---------------------------------------------------------------------------------
    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self.ctx, self.layer_probs, self.traj = ctx, [], None
        store = self.store
        if store.size == 0 or ctx.rows.numel() == 0:
            return None
        self.traj = TrajectoryQuery(store, ctx.rows.numel())
        if ctx.embeddings is None:
            return None
        scores, rows = store.semantic_match(ctx.embeddings)  # [N], [N]
        self.sem_sum += float(scores.sum())
        self.sem_n += scores.numel()
        L, d = self.spec.num_layers, self.distance
        reqs: list[PrefetchRequest] = []
        for target in range(min(d, L)):
            probs = store.maps[rows, target]  # [N, E]
            reqs += plan_for_layer(
                target, -1, merge_rows(probs, select_by_delta(probs, scores, self.spec.top_k, self.rule))
            )
        # The matched rows forecast every layer of this iteration: hints for map-aware eviction.
        hints = tuple((layer, tuple(store.maps[rows, layer].amax(dim=0).tolist())) for layer in range(L))
        self.plans += 1
        return PrefetchPlan(tuple(reqs), replace=True, iteration=ctx.iteration, layer_probs=hints)

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        ctx = self.ctx
        if ctx is None or event.iteration != ctx.iteration or event.layer != len(self.layer_probs):
            self.ctx = None  # out of step (e.g. a dropped context): sit this iteration out
            return None
        probs = event.probs[ctx.rows].float()  # [N, E]
        self.layer_probs.append(probs)
        L, layer = self.spec.num_layers, event.layer
        plan = None
        if self.traj is not None and self.traj.store.size:
            sim = self.traj.extend(layer, probs)  # [N, C]
            target = layer + self.distance
            if target < L:
                scores, rows = sim.max(dim=1)
                self.traj_sum += float(scores.sum())
                self.traj_n += scores.numel()
                maps = self.store.maps
                p = maps[rows, target]  # [N, E]
                chosen = merge_rows(p, select_by_delta(p, scores, self.spec.top_k, self.rule))
                hints = tuple((t, tuple(maps[rows, t].amax(dim=0).tolist())) for t in range(target, L))
                self.plans += 1
                plan = PrefetchPlan(
                    tuple(plan_for_layer(target, layer, chosen)), iteration=event.iteration, layer_probs=hints
                )
        if layer == L - 1:
            self.ctx, self.traj = None, None  # the HistoryRecorder inserts the maps (after this search)
        return plan

    def end_requests(self) -> None:
        self.ctx, self.traj = None, None

    def stats(self) -> dict[str, Any]:
        return {
            "map_store_size": self.store.size,
            "map_store_capacity": self.store.capacity,
            "map_store_bytes": self.store.nbytes(),
            "mean_semantic_score": self.sem_sum / self.sem_n if self.sem_n else None,
            "mean_trajectory_score": self.traj_sum / self.traj_n if self.traj_n else None,
            "plans": self.plans,
        }
