"""The FineMoE predictor (spec §3.3-3.6, §3.9-3.10): expert maps matched by semantics for the
first d layers of an iteration and by the routing trajectory, refined after every layer, for the
rest; δ-sized selections; priority p / (l - l_now); batch plans merged by union and max.

Granularity (spec §6.2 #2-#4): one query row per real token of the iteration. In decode that is
each sequence's new token; in prefill every prompt token is its own row (semantic and trajectory
matches per token, plans merged over the tokens like a batch); `history.HistoryRecorder` makes
every row a store row when the iteration's last layer has routed (online mode).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from finemoe.expert_map import ExpertMapStore, TrajectoryQuery
from finemoe.predictor import (
    PredictorDeps,
    RankedRow,
    merge_rows,
    plan_for_layer,
    routing_rows,
    select_by_delta,
)
from finemoe.types import IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent, expert_id_table

if TYPE_CHECKING:
    from finemoe.device_plans import DeviceMatches

PRECISION_DECAY = 0.995  # per measured layer plan: the running precision spans a few hundred plans
PRECISION_WARMUP = 50.0  # planned experts measured before the precision floor may withhold plans


class FineMoEPredictor:
    name = "finemoe"

    def __init__(self, deps: PredictorDeps) -> None:
        if deps.maps is None:
            raise ValueError("the finemoe predictor needs an expert map store")
        self.spec, self.store = deps.spec, deps.maps
        self.store: ExpertMapStore
        self.num_layers = deps.spec.num_layers  # L (a property of the spec: read once)
        self.distance = deps.distance
        self.rule = deps.delta_rule
        self.window = deps.trajectory_window
        self.candidates = deps.trajectory_candidates
        self.lag = deps.trajectory_lag  # 1: batch-1 decode plans from the match one layer behind
        self._prev: tuple[float, int] | None = None  # (score, row) of that match (lag 1)
        # search="device": graphed decode steps match on the GPU (`device_plans.DeviceMatches`, one
        # layer behind); set by the engine
        self.device: DeviceMatches | None = None
        self.device_matched = 0  # device matches planned from (layers after the first; before `map_min_score`)
        self.min_score = deps.map_min_score if deps.map_min_score > 0 else -math.inf  # 0: every match
        self.semantic = deps.semantic
        self.values = deps.map_values
        self.hints = deps.layer_probs
        self.in_prefill = deps.prefill_plans == "maps"  # plan prefill iterations from the maps
        self.ctx: IterationContext | None = None
        self.traj: TrajectoryQuery | None = None
        self.layers_seen = 0  # layers of the current iteration routed so far
        self.row0 = -1
        self.sem_sum = self.sem_n = 0.0
        self.traj_sum = self.traj_n = 0.0
        self.plans = 0
        # Self-measured precision of the map plans (decode): decayed counts of planned experts and
        # of those the router then chose; below `min_precision` the map plans are withheld (still
        # measured, still eviction hints) until the running precision recovers.
        self.min_precision = deps.map_min_precision
        # target layer -> experts the maps chose for it: a set, or at batch 1 (matched row ranked, how many)
        self._planned: dict[int, set[int] | tuple[RankedRow, int]] = {}
        self.prec_used = self.prec_planned = 0.0
        self.withheld = 0  # map plans computed but not issued
        self._eids = expert_id_table(self.num_layers, deps.spec.num_experts)

    # -- events ---------------------------------------------------------------------------------
    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self.ctx, self.layers_seen, self.traj = ctx, 0, None
        self._prev = None
        self._planned = {}
        row_list = ctx.row_list()
        n_rows = len(row_list)
        self.row0 = row_list[0] if n_rows == 1 else -1  # the only row, at batch 1
        store = self.store
        if store.size == 0 or n_rows == 0 or (ctx.is_prefill and not self.in_prefill):
            self.ctx = None  # nothing to match (or prefill left to the gate / to demand loads)
            return None
        self.traj = TrajectoryQuery(store, n_rows, self.window, self.candidates)
        emb = ctx.host_embeddings()
        if emb is None or not self.semantic:
            return None
        L, d = self.num_layers, self.distance
        reqs: list[PrefetchRequest] = []
        if emb.shape[0] == 1:  # batch 1: plain numbers and the matched row's cached ranking
            score, row = store.semantic_match_one(emb.numpy()[0])  # (host embeddings: float32 CPU)
            self._prev = (score, row)  # lag 1: layer 0 plans from the semantic match
            self.sem_sum += score
            self.sem_n += 1
            for target in range(min(d, L)):
                reqs += self._row_requests(target, -1, row, score)
            matched = store.maps[row : row + 1] if self.hints else None  # [1, L, E]
        else:
            scores, rows = store.semantic_match(emb)  # [N], [N]
            self.sem_sum += float(scores.sum())
            self.sem_n += scores.numel()
            matched = store.maps[rows]  # [N, L, E]
            for target in range(min(d, L)):
                reqs += plan_for_layer(target, -1, self._gated(target, self._select(matched[:, target], scores)))
        # The matched rows forecast every layer of this iteration: hints for map-aware eviction.
        hints = tuple(enumerate(matched.amax(dim=0).unbind(0))) if self.hints else ()  # (layer, [E]) per layer
        self.plans += 1
        return PrefetchPlan(tuple(reqs), replace=True, iteration=ctx.iteration, layer_probs=hints)

    @property
    def graphed_reads_probs(self) -> bool:
        """A graphed step's router probabilities are read unless the GPU matches the maps
        (search="device": the routed ids only)."""
        return self.device is None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        ctx = self.ctx
        if ctx is None or event.iteration != ctx.iteration or event.layer != self.layers_seen:
            self.ctx = None  # out of step (e.g. a dropped context): sit this iteration out
            return None
        self.layers_seen += 1
        L, layer = self.num_layers, event.layer
        planned = self._planned.pop(layer, None)
        if planned is not None and not ctx.is_prefill:  # how many of the experts planned for this layer it chose
            if type(planned) is tuple:  # batch 1: (matched row ranked, experts taken), one token's k distinct ids
                ranked, n = planned
                rank = ranked._rank or ranked.rank()
                used = 0
                for e in event.topk_lists()[self.row0]:
                    if rank[e] < n:
                        used += 1
            else:
                routed = event.topk_ids[ctx.rows] if event.topk_ids.shape[0] != ctx.rows.numel() else event.topk_ids
                used = len(planned.intersection(routed.view(-1).tolist()))
                n = len(planned)
            self.prec_used = PRECISION_DECAY * self.prec_used + used
            self.prec_planned = PRECISION_DECAY * self.prec_planned + n
        target = layer + self.distance
        if layer == L - 1:
            self.ctx = None
        if self.traj is None or target >= L:
            return None  # no layer left to plan for from here
        if self.row0 >= 0:  # decode at batch 1: the lean path, NumPy on host rows
            lagged = False  # planned from the match one layer behind (at layer 0: the semantic one)
            dev = self.device
            if dev is not None and dev.iteration == event.iteration:  # matched on the GPU, one layer behind
                if target <= event.launched and not self.hints:
                    return None  # its compute is launched already: no plan, no match to read (unless
                    # map-aware eviction reads the plan's probabilities as keys)
                lagged = True
                if layer > 0:
                    match: tuple[float, int] | None = dev.match(layer - 1)
                    self.device_matched += 1
                else:
                    match = self._prev
                if match is None:
                    return None
                score, row = match
            else:
                if self.values == "probs":
                    q = event.host_probs_np()[self.row0]
                else:
                    q = routing_rows(event, ctx.rows, "counts")[0].numpy()
                score, row = self.traj.best(layer, q)
                if self.lag:
                    lagged = True
                    prev, self._prev = self._prev, (score, row)
                    if prev is None:
                        return None
                    score, row = prev
            if layer or not lagged:  # (a lagged layer 0's score is the semantic one, counted as such)
                self.traj_sum += score
                self.traj_n += 1
            hints = ((target, self.store.by_layer[target, row]),) if self.hints else ()  # [E]
            self.plans += 1
            reqs = self._row_requests(target, layer, row, score)
            return tuple.__new__(PrefetchPlan, (reqs, False, event.iteration, hints))  # (no Python frame)
        sim = self.traj.extend(layer, routing_rows(event, ctx.rows, self.values))  # [N, C]
        scores, rows = sim.max(dim=1)
        self.traj_sum += float(scores.sum())
        self.traj_n += scores.numel()
        p = self.store.by_layer[target, rows]  # [N, E]
        chosen = self._select(p, scores)
        hints = ((target, p.amax(dim=0)),) if self.hints else ()
        self.plans += 1
        chosen = self._gated(target, chosen)
        return PrefetchPlan(tuple(plan_for_layer(target, layer, chosen)), iteration=event.iteration, layer_probs=hints)

    def _withhold(self) -> bool:
        """True while the measured precision is below `min_precision`: plans are then withheld."""
        if (
            self.min_precision > 0
            and self.prec_planned >= PRECISION_WARMUP
            and self.prec_used < self.min_precision * self.prec_planned
        ):
            self.withheld += 1
            return True
        return False

    def _gated(self, target: int, chosen: dict[int, float]) -> dict[int, float]:
        """Remember the plan for `target` (to measure it when that layer routes); withhold it while
        the measured precision is below `min_precision`."""
        if not chosen:
            return chosen
        self._planned[target] = set(chosen)
        return {} if self._withhold() else chosen

    def _row_requests(self, target: int, layer_now: int, row: int, score: float) -> tuple[PrefetchRequest, ...]:
        """`plan_for_layer` of the δ selection from one matched store row at layer `target` (batch
        1: the row's cached ranking and requests, no array ops), remembered and gated as `_gated`;
        nothing when `score` is below `map_min_score`."""
        if score < self.min_score:
            return ()
        ranked = self.store.ranked(target, row)
        n = ranked.count(score, self.spec.top_k, self.rule)
        self._planned[target] = (ranked, n)  # n >= 1 (top-k floor)
        if self.min_precision > 0 and self._withhold():  # (the guard spares a call per layer when off)
            return ()
        return ranked.requests(target, max(target - layer_now, 1), n, self._eids[target])

    def _select(self, probs: torch.Tensor, scores: torch.Tensor) -> dict[int, float]:
        """δ selection and batch merge of one target layer over N > 1 rows: {expert: p}. Rows
        whose match scores below `map_min_score` plan nothing."""
        if self.min_score > -math.inf:
            keep = scores >= self.min_score  # [N]
            if not bool(keep.any()):
                return {}
            probs, scores = probs[keep], scores[keep]
        return merge_rows(probs, select_by_delta(probs, scores, self.spec.top_k, self.rule))

    def end_requests(self) -> None:
        self.ctx, self.traj = None, None

    def stats(self) -> dict[str, Any]:
        self.store.apply_pending()  # (a graphed step's map held back, `ExpertMapStore.add_later`)
        return {
            "map_store_size": self.store.size,
            "map_store_capacity": self.store.capacity,
            "map_store_bytes": self.store.nbytes(),
            "mean_semantic_score": self.sem_sum / self.sem_n if self.sem_n else None,
            "mean_trajectory_score": self.traj_sum / self.traj_n if self.traj_n else None,
            "plans": self.plans,
            "map_plan_precision": self.prec_used / self.prec_planned if self.prec_planned else None,
            "map_plans_withheld": self.withheld,
            "device_matched_plans": self.device_matched,
        }
