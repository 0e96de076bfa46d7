"""Recording history: every finished iteration's expert maps go into the `ExpertMapStore`, every
finished request's activation matrix into the `RequestMatrixStore` (online mode, spec §3.2 step 5).

Requests are tracked by stable id (`IterationContext.batch_request_ids`): a request's matrix is
committed when it leaves the batch (`finished_ids`), when a static batch ends (the next prefill
without ids, or `end_requests`), whichever comes first.

The recorder is a predictor that never plans. It runs after the policy's predictor on the same
thread (`PredictorChain`), so a search never sees a store that changes under it mid-iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from finemoe.baselines import RunningActivations
from finemoe.expert_map import SemanticPart
from finemoe.predictor import Predictor, PredictorDeps, routing_rows
from finemoe.types import IterationContext, PrefetchPlan, RoutingEvent


class HistoryRecorder:
    name = "history"
    # whether a graphed decode step must bring every router's logits to the host for it (`predictor.
    # reads_router_probs`): not while the step records its expert map on the device (set by the
    # static decoder at capture, `step_record`)
    graphed_reads_probs = True
    # a graphed step's record read at the insert, at the next step's first store read (`StepRecord.later`);
    # False: waited for at the step's last layer (`take`, as before session 45; a benchmark's paired arm)
    read_at_insert = True

    def __init__(self, deps: PredictorDeps) -> None:
        self.spec, self.maps, self.requests = deps.spec, deps.maps, deps.requests
        self.values = deps.map_values  # "probs", or top-k "counts" (the hit-count ablation)
        self.rows = deps.store_rows  # "all": every token; "last": in prefill only each prompt's last token
        self.ctx: IterationContext | None = None
        self.layer_probs: list[torch.Tensor] = []  # [N, E] per layer of the iteration
        # the requests in flight's activation counts, kept only for a request store (None: no
        # per-layer counts at all, `presets.records_requests`)
        self.running = (
            RunningActivations(self.spec.num_layers, self.spec.num_experts) if self.requests is not None else None
        )
        self.last_layer = self.spec.num_layers - 1
        self.maps_added = 0
        self.requests_added = 0
        # a decode step's insert into a full store: the embedding's share of its redundancy scores,
        # made at the step's start (in a graphed step the host's work there overlaps the GPU's; at
        # the last layer nothing does)
        self._semantic: SemanticPart | None = None

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        if self.running is not None:
            self._commit(self.running.begin(ctx))
        self.ctx, self.layer_probs, self._semantic = ctx, [], None
        maps = self.maps
        if maps is not None and not ctx.is_prefill and maps.size >= maps.capacity and ctx.rows.numel():
            emb = ctx.host_embeddings()
            if emb is not None:
                self._semantic = maps.semantic_part(emb)
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        ctx = self.ctx
        if ctx is None or event.iteration != ctx.iteration or event.layer != len(self.layer_probs):
            self.ctx = None
            return None
        # (the work stays per layer: in a graphed step the host reads the routings while the GPU runs
        # the later layers, so done at the last layer it would lengthen the step; session 40, s40d)
        whole = ctx.rows.numel() == event.topk_ids.shape[0]  # every position a live row (batch 1): no gathers
        step_maps = ctx.step_maps if self.values == "probs" else None  # (the device records the step's map)
        if step_maps is not None:
            self.layer_probs.append(None)  # type: ignore[arg-type]  # (read whole at the last layer)
        elif whole and self.values == "probs":
            self.layer_probs.append(event.host_probs())
        else:
            self.layer_probs.append(routing_rows(event, ctx.rows, self.values))
        if self.running is not None:
            self.running.count(event.layer, event.topk_ids if whole else event.topk_ids[ctx.rows], ctx.request_of_row)
        if event.layer == self.last_layer:
            emb = ctx.host_embeddings()
            if self.maps is not None and emb is not None and ctx.rows.numel():
                if step_maps is not None:
                    # a graphed decode step: the device's record launched now and read at the insert,
                    # when the next step first reads the store (waiting for it here, at the step's
                    # end where the GPU has nothing left, lengthened the step: session 45)
                    self.maps.apply_pending()  # (none held in the usual flow: the step's start applied it)
                    rows = None if whole else ctx.rows
                    if self.read_at_insert:
                        later: torch.Tensor | Callable[[], torch.Tensor] = partial(_rows_of, step_maps.later(), rows)
                    else:
                        later = step_maps.take() if rows is None else step_maps.take()[rows]
                    self.maps.add_later(emb, later, self._semantic)  # [N, D], [N, L, E] (or their reader)
                else:
                    maps = torch.stack(self.layer_probs, dim=1)  # [N, L, E]
                    if ctx.is_prefill and self.rows == "last":
                        req = ctx.request_of_row
                        last = torch.ones_like(req, dtype=torch.bool)
                        last[:-1] = req[1:] != req[:-1]  # rows are ordered by request, then position
                        emb, maps = emb[last], maps[last]
                    self.maps.add(emb, maps, self._semantic)
                self._semantic = None
                self.maps_added += ctx.rows.numel()
            self.ctx = None
        return None

    def _commit(self, mats: list[torch.Tensor]) -> None:
        if self.requests is None:
            return
        for mat in mats:  # [L, E]
            if mat.sum() > 0:
                self.requests.add(mat)
                self.requests_added += 1

    def end_requests(self) -> None:
        if self.running is not None:
            self._commit(self.running.pop_all())
        self.ctx = None
        if self.maps is not None:
            self.maps.apply_pending()

    def stats(self) -> dict[str, Any]:
        if self.maps is not None:
            self.maps.apply_pending()
        return {"maps_recorded": self.maps_added, "requests_recorded": self.requests_added}


class PredictorChain:
    """Several predictors fed the same events in order; their plans are merged into one: the
    requests and eviction hints concatenated, `replace` if any plan replaces (only a member's
    iteration-start plan does), the latest iteration."""

    def __init__(self, members: list[Predictor]) -> None:
        self.members = members
        self.name = "+".join(m.name for m in members)

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        out = None
        for m in self.members:
            out = self._merge(out, m.on_iteration_start(ctx))
        return out

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        out = None
        for m in self.members:
            plan = m.on_routing(event)
            if plan is not None:
                if out is None:
                    out = plan
                else:  # `_merge`, inlined (a call per layer-step in the replay)
                    it = out.iteration if out.iteration >= plan.iteration else plan.iteration
                    reqs, hints = out.requests + plan.requests, out.layer_probs + plan.layer_probs
                    out = tuple.__new__(PrefetchPlan, (reqs, out.replace or plan.replace, it, hints))
        return out

    @staticmethod
    def _merge(a: PrefetchPlan | None, b: PrefetchPlan | None) -> PrefetchPlan | None:
        if a is None or b is None:
            return b if a is None else a
        it = a.iteration if a.iteration >= b.iteration else b.iteration  # max, without the call
        # (requests, replace, iteration, layer_probs), made without the named tuple's Python frame
        return tuple.__new__(
            PrefetchPlan, (a.requests + b.requests, a.replace or b.replace, it, a.layer_probs + b.layer_probs)
        )

    def end_requests(self) -> None:
        for m in self.members:
            m.end_requests()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.members:
            out.update(m.stats())
        return out


def _rows_of(read: Callable[[], torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
    """The recorded step's maps [N, L, E]: `read()` [T, L, E] at its live `rows` [N] (None: all)."""
    maps = read()
    return maps if rows is None else maps[rows]
