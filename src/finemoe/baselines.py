"""The paper's baseline predictors (spec §4, "baseline harness"), reproduced as named policies.

- `SpeculativeGatePredictor`: apply layer l+s's router to layer l's router input and prefetch its
  top-k. s = 1 is Mixtral-Offloading, s = 2 the ProMoE re-implementation of the paper. Runs
  synchronously inside the router hook, as the originals do.
- `MoEInfinityPredictor`: a request-level expert activation matrix (EAM, selection counts [L, E]
  so far), matched by cosine against the EAMs of past requests; prefetch the matched EAM's top
  max(k, E/4) experts for each of the next w layers with linearly decaying priority.

`RunningActivations` keeps the EAMs of the requests in flight by stable request id, so both the
static batches of `Engine.generate` and a continuous-batching scheduler (requests joining and
leaving between iterations) are tracked per request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finemoe.predictor import PredictorDeps
from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent, expert_id_table

EPS = 1e-12
# A batch-1 top-k over at least this many experts takes NumPy's stable argsort (E = 128: 3.4 µs
# against 6.8 for `tolist` and `sorted`); fewer take plain Python (E = 16: 1.1 against 2.2 µs).
# Both order equal probabilities by expert id, so they pick the same experts.
NUMPY_TOPK_MIN_E = 64


class SpeculativeGatePredictor:
    """Next-gate speculation: after layer l routes, run router l+s on layer l's router input."""

    name = "speculative-gate"
    graphed_reads_probs = False  # the router input, or the speculative logits a graphed step computed

    def __init__(self, deps: PredictorDeps) -> None:
        if deps.gate is None:
            raise ValueError("the speculative-gate predictor needs the model's routers (a gate function)")
        self.gate, self.stride = deps.gate, deps.distance
        self.in_prefill = deps.prefill_plans != "none"  # a finemoe refining gate may sit prefill out
        self.ctx: IterationContext | None = None
        self.n_rows = 0  # ctx.rows.numel(), read once per iteration
        self._whole: Any = None  # a router input of this iteration whose every position is a live row
        self.num_layers, self.k = deps.spec.num_layers, deps.spec.top_k  # (properties of the spec: read once)
        self._eids = expert_id_table(deps.spec.num_layers, deps.spec.num_experts)

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self.ctx, self.n_rows, self._whole = ctx, len(ctx.row_list()), None
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        target = event.layer + self.stride
        if target >= self.num_layers or target <= event.launched or (event.is_prefill and not self.in_prefill):
            return None  # (a layer whose compute is launched already: too late to plan for)
        spec, to_probs = event.speculated, event.speculated_probs
        done = spec.get(target) if spec is not None and to_probs is not None else None  # [T, E], CPU
        source = done if done is not None else event.hidden
        if source is None:
            return None
        ctx = self.ctx
        if ctx is None or ctx.iteration != event.iteration or source is self._whole:
            rows = source  # not a live iteration, or an input seen whole already
        elif self.n_rows == source.shape[0]:
            rows = self._whole = source  # every position is a live row (batch 1, no padding)
        else:
            rows = source[ctx.rows.to(source.device)]  # [N, H] or [N, E]
        # [N, E] CPU tensor or NumPy array, or None: the gate cannot say
        probs = to_probs(target, rows) if done is not None and to_probs is not None else self.gate(target, rows)
        if probs is None:
            return None
        k = self.k
        n, e = probs.shape
        if n == 1:  # decode at batch 1: plain Python or NumPy beat a handful of tensor ops
            eids = self._eids[target]
            if e >= NUMPY_TOPK_MIN_E:
                p = probs[0] if isinstance(probs, np.ndarray) else probs[0].float().numpy()  # [E] float32
                order = np.argsort(-p, kind="stable")[:k]  # descending, ties by expert id
                pairs = zip(order.tolist(), p[order].tolist(), strict=True)
                new = tuple.__new__
                return PrefetchPlan(
                    tuple([new(PrefetchRequest, (eids[e], v)) for e, v in pairs]), iteration=event.iteration
                )
            row = probs[0].tolist()
            top = sorted(range(e), key=row.__getitem__, reverse=True)[:k]  # stable: ties by expert id
            new = tuple.__new__  # the named tuples' own constructor, without their Python frames
            reqs = tuple([new(PrefetchRequest, (eids[e], row[e])) for e in top])
            return new(PrefetchPlan, (reqs, False, event.iteration, ()))  # (requests, replace, iteration, probs)
        # each row's top k, then the union over the rows with the max probability per expert (a
        # prefill routes N = prompt rows), in NumPy: a handful of torch ops cost more than the work
        # at these sizes. Ties go to the lower expert id, as at batch 1.
        p = probs if isinstance(probs, np.ndarray) else probs.float().numpy()  # [N, E]
        flat = np.argsort(-p, axis=1, kind="stable")[:, :k].reshape(-1)  # [N*k] expert ids, row by row
        at = np.arange(0, n * e, e).repeat(k)  # [N*k] each pick's row offset in the flat [N*E]
        best = np.zeros(e, dtype=np.float32)  # [E]
        np.maximum.at(best, flat, p.reshape(-1)[at + flat])
        chosen = np.zeros(e, dtype=bool)
        chosen[flat] = True
        ids = np.flatnonzero(chosen)  # the experts of any row's top k, ascending
        eids, new = self._eids[target], tuple.__new__
        pairs = zip(ids.tolist(), best[ids].tolist(), strict=True)
        reqs = tuple([new(PrefetchRequest, (eids[e], p)) for e, p in pairs])
        return new(PrefetchPlan, (reqs, False, event.iteration, ()))  # (requests, replace, iteration, probs)

    def end_requests(self) -> None:
        self.ctx = None

    def stats(self) -> dict[str, Any]:
        return {}


class RequestMatrixStore:
    """Past requests' expert activation matrices [R, L, E] (counts), first in first out."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.mats = torch.zeros(0, num_layers, num_experts)  # grows with use, up to capacity
        self.unit = torch.zeros(0, num_layers * num_experts)  # flattened, unit norm
        self.size = 0
        self._next = 0

    def add(self, mat: torch.Tensor) -> None:
        """Insert one request's EAM [L, E]; the oldest is replaced when full."""
        with torch.inference_mode(False):  # normal tensors: updatable inside inference mode and out
            self._add(mat)

    def _add(self, mat: torch.Tensor) -> None:
        row = self._next
        if row >= self.mats.shape[0]:  # grow (rows are only appended until the store is full)
            n = min(self.capacity, max(2 * self.mats.shape[0], 64))
            self.mats = torch.cat([self.mats, self.mats.new_zeros(n - self.mats.shape[0], *self.mats.shape[1:])])
            self.unit = torch.cat([self.unit, self.unit.new_zeros(n - self.unit.shape[0], self.unit.shape[1])])
        self.mats[row] = mat
        flat = mat.reshape(-1).float()
        self.unit[row] = flat / flat.norm().clamp_min(EPS)
        self._next = (row + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def match(self, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best stored EAM per query `mats` [B, L, E]: (cosine [B], row [B]). Store non-empty."""
        q = mats.reshape(mats.shape[0], self.unit.shape[1]).float()  # [B, L*E] (B may be 0)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(EPS)
        return (q @ self.unit[: self.size].T).max(dim=1)

    def state(self) -> dict[str, torch.Tensor]:
        full = self.size == self.capacity
        rows = [(self._next + i) % self.capacity for i in range(self.capacity)] if full else list(range(self.size))
        return {"eams": self.mats[rows].clone()}

    def load_rows(self, mats: torch.Tensor) -> None:
        self.size, self._next = 0, 0
        for m in mats[-self.capacity :]:
            self.add(m)


class RunningActivations:
    """Expert activation matrices (selection counts [L, E]) of the requests in flight.

    Keyed by stable request id (`IterationContext.batch_request_ids`). `batch` [B, L, E] holds the
    current iteration's requests in batch-row order; every request's entry in `by_id` is a view of
    its row, so counting is one tensor op per layer. `begin` returns the matrices of the requests
    that ended: the finished ids, those missing from a decode iteration (which holds every running
    request), or every request when a static batch starts.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.L, self.E = num_layers, num_experts
        self.by_id: dict[int, torch.Tensor] = {}  # id -> [L, E]
        self.ids: tuple[int, ...] = ()
        self._set_batch(torch.zeros(0, num_layers, num_experts))

    def _set_batch(self, batch: torch.Tensor) -> None:
        """`batch` [B, L, E] (a normal CPU float tensor) and `_np`, a NumPy view of the same memory:
        `count` adds through NumPy (a handful of torch ops per layer cost ~10x more at these sizes)."""
        self.batch = batch
        self._np = batch.numpy()

    def begin(self, ctx: IterationContext) -> list[torch.Tensor]:
        """Enter iteration `ctx`: pop the ended requests' matrices, line up the batch's rows."""
        with torch.inference_mode(False):  # `batch` stays a normal tensor whichever thread and mode count
            return self._begin(ctx)

    def _begin(self, ctx: IterationContext) -> list[torch.Tensor]:
        ended = self.pop_all() if ctx.starts_batch else [m for r in ctx.finished_ids if (m := self.pop(r)) is not None]
        ids = ctx.batch_request_ids
        if ctx.request_ids is not None and not ctx.is_prefill:
            # A decode iteration holds every running request: whoever is missing has left (even if
            # the context that named it was dropped by a searcher that fell behind).
            gone = set(self.by_id) - set(ids)
            ended += [m for r in sorted(gone) if (m := self.pop(r)) is not None]
        if ids != self.ids:
            zero = torch.zeros(self.L, self.E)
            self._set_batch(torch.stack([self.by_id.get(r, zero) for r in ids]) if ids else self.batch[:0])
            self.by_id.update({r: self.batch[i] for i, r in enumerate(ids)})
            self.ids = ids
        return ended

    def count(self, layer: int, topk_ids: torch.Tensor, request_of_row: torch.Tensor) -> None:
        """Add one layer's selections: `topk_ids` [N, k] int64 of the live rows, `request_of_row` [N]
        (CPU). Whole counts in float32: the same sums whatever the order they are added in."""
        mats, E = self._np, self.E
        B = mats.shape[0]
        ids = topk_ids.numpy()
        if B == 1:  # one request (batch 1): every row is its own
            mats[0, layer] += np.bincount(ids.reshape(-1), minlength=E)[:E]
            return
        flat = (request_of_row.numpy()[:, None] * E + ids).reshape(-1)  # [N*k] request * E + expert
        mats[:, layer] += np.bincount(flat, minlength=B * E)[: B * E].reshape(B, E)

    def pop(self, request_id: int) -> torch.Tensor | None:
        """Forget one request; its matrix [L, E] (a copy), or None if it never ran."""
        mat = self.by_id.pop(request_id, None)
        if mat is None:
            return None
        with torch.inference_mode(False):
            return mat.clone()

    def pop_all(self) -> list[torch.Tensor]:
        with torch.inference_mode(False):
            out = [m.clone() for m in self.by_id.values()]
            self.by_id, self.ids = {}, ()
            self._set_batch(self.batch[:0])
        return out


class MoEInfinityPredictor:
    """Request-level activation matching (the MoE-Infinity role in the paper's comparison)."""

    name = "moe-infinity"
    graphed_reads_probs = False  # the routed ids only

    def __init__(self, deps: PredictorDeps) -> None:
        if deps.requests is None:
            raise ValueError("the moe-infinity predictor needs a request-matrix store")
        self.spec, self.store, self.window = deps.spec, deps.requests, deps.distance
        self.keep = max(deps.spec.top_k, deps.spec.num_experts // 4)
        self.running = RunningActivations(deps.spec.num_layers, deps.spec.num_experts)
        self.ctx: IterationContext | None = None
        self.score_sum = self.score_n = 0.0
        self._eids = expert_id_table(deps.spec.num_layers, deps.spec.num_experts)

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self.running.begin(ctx)  # ended requests are dropped (the HistoryRecorder stores them)
        self.ctx = ctx
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        ctx = self.ctx
        if ctx is None or event.iteration != ctx.iteration:
            return None
        self.running.count(event.layer, event.topk_ids[ctx.rows], ctx.request_of_row)
        if self.store.size == 0:
            return None
        batch = self.running.batch  # [B, L, E]
        if batch.shape[0] == 1 and ctx.request_of_row.numel():  # batch 1: its one request is active
            active = batch
        else:
            active = batch[torch.unique(ctx.request_of_row)]  # [B', L, E]
            if active.shape[0] == 0:
                return None  # no live row this iteration: nothing to match
        scores, rows = self.store.match(active)
        self.score_sum += float(scores.sum())
        self.score_n += scores.numel()
        L, w = self.spec.num_layers, self.window
        first, end = event.layer + 1, min(event.layer + 1 + w, L)
        if first >= end:
            return tuple.__new__(PrefetchPlan, ((), True, event.iteration, ()))
        # every target layer's share and top experts in one set of ops (whole counts: exact sums)
        counts = self.store.mats[rows, first:end]  # [B', T, E]
        share = counts / counts.sum(dim=2, keepdim=True).clamp_min(EPS)
        top_p, top_i = torch.topk(share, self.keep, dim=2)  # [B', T, keep]
        ids, ps = top_i.tolist(), top_p.tolist()
        best: dict[ExpertId, float] = {}  # in the order targets, then rows, then rank
        eids = self._eids
        for j in range(end - first):
            decay, row_eids = 1.0 - j / w, eids[first + j]
            for b in range(len(ids)):
                for e, p in zip(ids[b][j], ps[b][j], strict=True):
                    eid = row_eids[e]
                    q = p * decay
                    if q > best.get(eid, 0.0):
                        best[eid] = q
                    elif eid not in best:
                        best[eid] = 0.0  # (max(0.0, q) with q <= 0: kept in first-seen order)
        new = tuple.__new__  # the named tuples' own constructor, without their Python frames
        reqs = tuple([new(PrefetchRequest, (eid, p)) for eid, p in best.items()])
        return new(PrefetchPlan, (reqs, True, event.iteration, ()))  # (requests, replace, iteration, probs)

    def end_requests(self) -> None:
        self.running.pop_all()  # the HistoryRecorder stores finished requests
        self.ctx = None

    def stats(self) -> dict[str, Any]:
        return {
            "request_store_size": self.store.size,
            "mean_request_match_score": self.score_sum / self.score_n if self.score_n else None,
        }
