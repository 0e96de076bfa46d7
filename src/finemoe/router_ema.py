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
Victims: the resident experts sorted by key, ties by least recent use then flat id l*E + e, kept
in a heap with lazy increase-key (keys and last uses only rise), as the plan-aware LFU heaps do.

Pending-plan protection as in the plan-aware heap policies: experts a pending plan selected for a
layer the forward pass has not reached are passed over, and taken (lowest key first) only when
nothing else can go.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import numpy as np

from finemoe.types import ExpertId, PrefetchPlan, RoutingEvent


class RouterEMAPolicy:
    """Eviction by the moving average of router probabilities (module docstring). The engine
    (`OffloadRuntime.policy_routes`) and the simulator call `on_routing` once a layer is served."""

    name = "router-ema"
    reads_layer_probs = False
    alpha = 0.3  # weight of the newest iteration (measured: 0.2-0.5 alike, 0.05 no better than LRU)

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.keys = np.full(num_layers * num_experts, -np.inf)  # [L*E] log A, float64
        self._key = self.keys.tolist()  # the same keys as Python floats (the heap compares these)
        self.rate = -math.log(1.0 - self.alpha)  # λ per iteration
        self._t = -1  # iterations seen by `on_routing` (its own count: monotonic)
        self._routed_iteration: int | None = None
        self._resident = [False] * (num_layers * num_experts)
        self._last = [0] * (num_layers * num_experts)  # step of the latest use, by flat id
        self._version = [0] * (num_layers * num_experts)
        # (key, last use, flat id, version) of resident experts, lowest first; keys and last uses
        # only rise, so an entry is at most stale-low: re-pushed when it reaches the top (lazy
        # increase-key), dropped if its version or residency moved on
        self._heap: list[tuple[float, int, int, int]] = []
        self._count = 0  # resident experts
        self._eid = [ExpertId(f // num_experts, f % num_experts) for f in range(num_layers * num_experts)]
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
        self._key[lay * E : lay * E + E] = row.tolist()  # every entry of the layer is stale now

    # -- residency ------------------------------------------------------------------------------
    def _push(self, flat: int) -> None:
        v = self._version[flat] + 1
        self._version[flat] = v
        heapq.heappush(self._heap, (self._key[flat], self._last[flat], flat, v))
        if len(self._heap) > 4 * self._count + 256:  # drop stale entries now and then
            live = [f for f in range(len(self._resident)) if self._resident[f]]
            for f in live:
                self._version[f] += 1
            self._heap = [(self._key[f], self._last[f], f, self._version[f]) for f in live]
            heapq.heapify(self._heap)

    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        if not self._resident[flat]:
            self._count += 1
            self._resident[flat] = True
        self._last[flat] = step
        self._push(flat)

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._layer_now = eid.layer
        self._last[eid.layer * self.num_experts + eid.expert] = step

    def on_access_many(self, eids: list[ExpertId], step: int) -> None:
        if not eids:
            return
        E, last = self.num_experts, self._last
        self._layer_now = eids[0].layer
        for eid in eids:
            last[eid.layer * E + eid.expert] = step

    def on_evict(self, eid: ExpertId) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        if self._resident[flat]:
            self._count -= 1
            self._resident[flat] = False

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
    def _pick(self, evictable: Callable[[ExpertId], bool], n: int, protected_too: bool) -> list[ExpertId]:
        """Up to `n` victims in (key, last use, flat id) order: unprotected ones `evictable`
        accepts, then (with `protected_too`) protected ones. Every live entry examined goes back
        in the heap (a victim the caller evicts goes stale there)."""
        heap, version, resident, key, last = self._heap, self._version, self._resident, self._key, self._last
        planned, first_unprotected, eids = self._planned, (self._layer_now + 1) * self.num_experts, self._eid
        found: list[ExpertId] = []
        held: list[tuple[float, int, int, int]] = []
        back: list[tuple[float, int, int, int]] = []
        while heap:
            entry = heapq.heappop(heap)
            k, used, flat, v = entry
            if version[flat] != v or not resident[flat]:
                continue  # stale: a newer entry exists, or evicted
            if k != key[flat] or used != last[flat]:
                version[flat] = v = v + 1  # its key or last use rose since: back in at its place
                heapq.heappush(heap, (key[flat], last[flat], flat, v))
                continue
            back.append(entry)
            if flat >= first_unprotected and flat in planned:
                held.append(entry)
                continue
            eid = eids[flat]
            if evictable(eid):
                found.append(eid)
                if len(found) == n:
                    break
        if protected_too and len(found) < n:  # nothing unprotected could go: protected ones, lowest first
            for entry in held:
                eid = eids[entry[2]]
                if evictable(eid):
                    found.append(eid)
                    if len(found) == n:
                        break
        for entry in back:
            heapq.heappush(heap, entry)
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
