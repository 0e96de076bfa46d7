"""Router-probability eviction: evict the expert the routers have been least likely to pick.

An eviction policy (the `EvictionPolicy` protocol of `policy`) that reads every layer's router
probabilities, not only its top-k choices. Each expert keeps an exponential moving average, over
iterations, of the probability its router gave it (the mean over the iteration's tokens); the
lowest average goes first. It estimates how likely the next iteration is to need the expert, the
quantity Belady's optimal eviction would rank by if the future were a coin per expert: near misses
(experts just below the top-k) count, which top-k counts (LRU, LFU, decayed LFU) cannot see.
Measured against LRU and decayed-frequency eviction on the workload traces in
`docs/design/finemoe.md` ("Eviction").

Keys: the average at iteration t is A·e^(-λt) with A = Σ_τ α·p(τ)·e^(λτ), λ = -log(1 - α), and
e^(-λt) is common to all experts, so log A orders them and changes only when the expert's layer
routes (a vectorised log-add-exp per layer and iteration). Experts never routed have -inf (first).
The average survives eviction (what the routers favour does not change when an expert leaves).
Victims: the resident experts sorted by key, ties by least recent use then flat id l*E + e.

Pending-plan protection as in the plan-aware heap policies: experts a pending plan selected for a
layer the forward pass has not reached are passed over, and taken (lowest key first) only when
nothing else can go.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from finemoe.types import ExpertId, PrefetchPlan, RoutingEvent, expert_id_table


class RouterEMAPolicy:
    """Eviction by the moving average of router probabilities (module docstring). The engine
    (`OffloadRuntime.policy_routes`) and the simulator call `on_routing` once a layer is served."""

    name = "router-ema"
    reads_layer_probs = False
    SLACK = 24  # victims searched among the n + SLACK lowest keys first
    alpha = 0.3  # weight of the newest iteration (measured: 0.2-0.5 alike, 0.05 no better than LRU)

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.keys = np.full(num_layers * num_experts, -np.inf)  # [L*E] log A, float64
        self.rate = -math.log(1.0 - self.alpha)  # λ per iteration
        self._t = -1  # iterations seen by `on_routing` (its own count: monotonic)
        self._routed_iteration: int | None = None
        self.resident = np.zeros(num_layers * num_experts, dtype=bool)  # [L*E]
        self.last = np.zeros(num_layers * num_experts, dtype=np.int64)  # [L*E] step of the latest use
        self._count = 0  # resident experts
        self._eid = [e for row in expert_id_table(num_layers, num_experts) for e in row]  # by flat id l*E+e
        self._planned: set[int] = set()  # flat ids a pending plan selected
        self._iteration = -1
        self._layer_now = -1

    # -- what the routers said ------------------------------------------------------------------
    def on_routing(self, event: RoutingEvent) -> None:
        """Layer `event.layer` routed: fold the mean of its probabilities [T, E] into the averages
        (T: the iteration's positions; in the engine a left-padded batch's padding rows count too,
        the simulator has none)."""
        if event.iteration != self._routed_iteration:
            self._routed_iteration = event.iteration
            self._t += 1
        p = event.host_probs()  # [T, E] float32, CPU
        if p.shape[0] > 1:
            p = p.mean(dim=0, keepdim=True)
        new = p.numpy()[0].astype(np.float64)  # [E]
        new *= self.alpha
        new += 1e-300  # log(0) stays finite: below anything routed
        np.log(new, out=new)
        new += self.rate * self._t
        E, lay = self.num_experts, event.layer
        row = self.keys[lay * E : lay * E + E]
        np.logaddexp(row, new, out=row)

    # -- residency ------------------------------------------------------------------------------
    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        self._count += not self.resident[flat]
        self.resident[flat] = True
        self.last[flat] = step

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._layer_now = eid.layer
        self.last[eid.layer * self.num_experts + eid.expert] = step

    def on_access_many(self, eids: list[ExpertId], step: int) -> None:
        if not eids:
            return
        E, last = self.num_experts, self.last
        self._layer_now = eids[0].layer
        for eid in eids:
            last[eid.layer * E + eid.expert] = step

    def on_evict(self, eid: ExpertId) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        self._count -= bool(self.resident[flat])
        self.resident[flat] = False

    # -- plans ----------------------------------------------------------------------------------
    def on_iteration(self, iteration: int) -> None:
        if iteration > self._iteration:
            self._iteration, self._layer_now = iteration, -1
            self._planned.clear()

    def on_plan(self, plan: PrefetchPlan) -> None:
        self.on_iteration(plan.iteration)
        E = self.num_experts
        self._planned.update(r.expert.layer * E + r.expert.expert for r in plan.requests)

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid.layer * self.num_experts + eid.expert in self._planned

    # -- victims --------------------------------------------------------------------------------
    def _order(self, m: int | None) -> list[int]:
        """Resident flat ids, lowest key first (ties: least recent use, then flat id): the first
        `m` of them and every one tied with the m-th (None: all)."""
        flats = np.flatnonzero(self.resident)  # [S]
        keys = self.keys[flats]
        if m is not None and m < len(flats):
            cut = keys[np.argpartition(keys, m - 1)[m - 1]]  # the m-th lowest key
            pick = keys <= cut
            flats, keys = flats[pick], keys[pick]
        return flats[np.lexsort((flats, self.last[flats], keys))].tolist()

    def _candidates(self, m: int) -> Iterator[int]:
        """`_order`, lazily: the lowest `m` keys first, the rest only if the caller reads on."""
        head = self._order(m)
        yield from head
        if len(head) < self._count:
            seen = set(head)
            yield from (f for f in self._order(None) if f not in seen)

    def _pick(self, evictable: Callable[[ExpertId], bool], n: int, protected_too: bool) -> list[ExpertId]:
        planned, first_unprotected = self._planned, (self._layer_now + 1) * self.num_experts
        found: list[ExpertId] = []
        held: list[int] = []
        # most searches end within the lowest few keys (passed over: this layer's pinned experts,
        # protected ones, copies in flight): order those first, everything only if they run out
        for flat in self._candidates(n + self.SLACK):
            if flat >= first_unprotected and flat in planned:
                held.append(flat)
                continue
            eid = self._eid[flat]
            if evictable(eid):
                found.append(eid)
                if len(found) == n:
                    return found
        if protected_too:  # nothing unprotected could go: the protected ones, lowest key first
            for flat in held:
                eid = self._eid[flat]
                if evictable(eid):
                    found.append(eid)
                    if len(found) == n:
                        break
        return found

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        found = self._pick(evictable, 1, True)
        return found[0] if found else None

    def victims(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """Up to `n` unprotected victims for the misses of `layer` (its plans no longer protect)."""
        self._layer_now = layer
        return self._pick(evictable, n, False)

    def prefetch_victims(self, evictable: Callable[[ExpertId], bool], n: int) -> list[ExpertId]:
        return self._pick(evictable, n, False)
