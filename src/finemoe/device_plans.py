"""FineMoE's per-layer planning as device tensor ops: the trajectory match, δ selection and the
residency filter (design and measurements: docs/design/device_plans.md). The engine's
`search="device"` captures the match in graphs beside its graphed decode segments
(`DeviceMatches`); δ selection and the residency filter are not used by the engine yet.

Batch-1 decode only. Every operation writes into tensors allocated up front, reads nothing back to
the host and takes no data-dependent branch on the host, so a graphed decode segment can capture it
(on a side stream, where it overlaps the layer's own kernels). It mirrors the host objects'
arithmetic (`expert_map.TrajectoryQuery.best` with every stored map followed, i.e.
`trajectory_candidates=0`, and `predictor.select_by_delta`) in float32: the same best rows up to
exact score ties, the same δ counts up to running sums within `TIE_EPS` of δ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from finemoe import fused_match
from finemoe.errors import ConfigError
from finemoe.expert_map import EPS, ExpertMapStore, StoreGeometry
from finemoe.fused_match import catch_up
from finemoe.predictor import TIE_EPS

STAGED_ROWS = 64  # rows `DevicePlanner.sync` copies one by one; more are copied as a whole store


def packed_score(packed: np.ndarray) -> tuple[float, int]:
    """(score, row) of a `DevicePlanner.packed` [3] read on the host: the best ratio over the
    query's norm, as `TrajectoryQuery.best` scores it."""
    best, row, q_sq = packed.tolist()
    return best / max(max(q_sq, 0.0) ** 0.5, EPS), int(row)


@dataclass(frozen=True)
class DevicePlan:
    """One layer's planning result, read back to the host: the best map row and its trajectory
    score, the expert ids δ selected at the target layer and those of them not resident (ascending),
    and the matched row's probabilities there ([E])."""

    score: float
    row: int
    planned: list[int]
    needed: list[int]
    probs: list[float]


class DevicePlanner:
    """A fixed-capacity device mirror of an `ExpertMapStore` and one query's running match.

    Tensors (C = the store's capacity, so captured graphs keep their addresses):
    `maps` [L, C, E] float32 layer-major; `norms` [L, C] the stored rows' prefix norms clipped to
    >= EPS, +inf past the valid rows (whose ratio is then 0, and a valid row ranks first among
    equals); `dot` [C] the running dot products of the current iteration; `packed` [3] = (the best
    ratio, its row, the query's running squared norm) after the latest `step`, one host copy (rows
    < 2^24 are exact in float32; the score is the ratio over the query's norm, `packed_score`);
    `score` [1] and `row` [1] likewise for `plan`; `planned`, `needed` [E] bool and `probs` [E] of
    the latest `plan`. `step` is six kernels: the fewer, the less a graphed segment waits on it.
    """

    def __init__(
        self,
        geometry: StoreGeometry,
        capacity: int,
        top_k: int,
        device: torch.device | str = "cpu",
        rule: str = "paper",
        min_score: float = 0.0,
    ) -> None:
        if rule not in ("paper", "demo", "topk"):
            raise ConfigError(f"unknown delta rule {rule!r}; choose one of paper, demo, topk")
        L, E = geometry.num_layers, geometry.num_experts
        self.geometry, self.capacity, self.rule = geometry, capacity, rule
        self.top_k = min(top_k, E)
        self.min_score = min_score
        self.size = 0
        self.version = -1  # the store version loaded (`ExpertMapStore.version`)
        dev = torch.device(device)
        f32 = torch.float32
        self.maps = torch.zeros(L, capacity, E, device=dev, dtype=f32)
        self.norms = torch.full((L, capacity), torch.inf, device=dev, dtype=f32)
        self.dot = torch.zeros(capacity, device=dev, dtype=f32)
        self.packed = torch.zeros(3, device=dev, dtype=f32)  # (best ratio, its row, the query's squared norm)
        self.best, self.q_sq = self.packed[0:1], self.packed[2:3]  # views: written in place
        self.p = torch.zeros(E, device=dev, dtype=f32)  # this layer's router probabilities, when not float32 already
        self.ratio = torch.zeros(capacity, device=dev, dtype=f32)
        self.score = torch.zeros(1, device=dev, dtype=f32)
        self.row = torch.zeros(1, device=dev, dtype=torch.int64)
        self.probs = torch.zeros(E, device=dev, dtype=f32)
        self.planned = torch.zeros(E, device=dev, dtype=torch.bool)
        self.needed = torch.zeros(E, device=dev, dtype=torch.bool)
        self._sorted = torch.zeros(E, device=dev, dtype=f32)
        self._order = torch.zeros(E, device=dev, dtype=torch.int64)
        self._cum = torch.zeros(E, device=dev, dtype=f32)
        self._rank = torch.arange(E, device=dev)  # [E] positions in sorted order
        self._take = torch.zeros(E, device=dev, dtype=torch.bool)
        # `sync`'s staging of a few rows, row-major so the first n are contiguous: pinned host
        # [R, L, E] maps, [R, L] norms, [R] ids, and their device twins
        self._stage: tuple[torch.Tensor, ...] | None = None
        self._staged: torch.cuda.Event | None = None  # the staged copies' completion (CUDA)
        self._row_in_packed = False  # the latest step was fused: `row` not written (see `plan`)
        # the fused catch-up (`bind_logits`, `restart`, `catch_up`): per layer its `packed` [L, 3],
        # the last layer in the running sums [1] (-1: none), the routers' logits addresses [L]
        self.rows = torch.zeros(L, 3, device=dev, dtype=f32)
        self.state = torch.full((1,), -1, device=dev, dtype=torch.int32)
        self.table = torch.zeros(L, device=dev, dtype=torch.int64)
        self._like: torch.Tensor | None = None  # one bound logits tensor (their dtype)
        self._bound: list[torch.Tensor | None] = []  # (kept alive while their addresses are in `table`)
        self._bound_through = -1  # layers 0 .. this have bound logits

    def nbytes(self) -> int:
        """Device memory held (the store copy dominates: L x C x E float32), outside the expert
        budget; each storage counted once (`best`, `q_sq` are views of `packed`)."""
        tensors = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        tensors += [t for t in self._stage or () if t.device.type != "cpu"]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def load(self, store: ExpertMapStore) -> None:
        """Copy `store`'s valid rows in (between decode steps, never while a graph is captured)."""
        store.apply_pending()
        g = store.geometry
        if (g.num_layers, g.num_experts) != (self.geometry.num_layers, self.geometry.num_experts):
            raise ConfigError(
                f"map store geometry {g.num_layers}x{g.num_experts} does not match the planner's "
                f"{self.geometry.num_layers}x{self.geometry.num_experts}"
            )
        n = store.size
        if n > self.capacity:
            raise ConfigError(f"map store holds {n} rows, more than the planner's capacity {self.capacity}")
        with torch.no_grad():
            self.maps[:, :n].copy_(store.by_layer[:, :n])
            self.maps[:, n:].zero_()
            self.norms[:, :n].copy_(torch.from_numpy(store.clipped_norms()))
            self.norms[:, n:].fill_(torch.inf)
        self.size, self.version = n, store.version

    def sync(self, store: ExpertMapStore) -> int:
        """Bring the copy up to `store`'s version: the rows written since, when the store's write
        log reaches back to the copy's version and they are at most `STAGED_ROWS` (online learning
        writes a row per decode token), through pinned staging buffers without a host wait; else
        the whole store (`load`; also when the store shrank). Returns the rows copied. Between
        decode steps only, like `load`."""
        store.apply_pending()
        if store.version == self.version and store.size == self.size:
            return 0
        rows = self._staged_rows(store)
        if rows is None:
            self.load(store)
            return store.size
        if rows:
            self._copy_rows(store, rows)
        self.size, self.version = store.size, store.version
        return len(rows)

    def full_load_due(self, store: ExpertMapStore) -> bool:
        """Whether the next `sync` copies the whole store (`load`: blocking copies from pageable host
        memory) rather than nothing or a few staged rows. An insert the store holds back
        (`ExpertMapStore.add_later`) is not applied here (this is asked before a step's first launch):
        its row is one staged row more."""
        same = store.version == self.version and store.size == self.size
        return not same and self._staged_rows(store, apply=False) is None

    def _staged_rows(self, store: ExpertMapStore, apply: bool = True) -> list[int] | None:
        """The rows `sync` would stage (possibly none), or None when it must load the whole store
        (`apply` False: without applying an insert the store holds back)."""
        rows = None if store.size < self.size else store.rows_written_since(self.version, apply)
        if rows is None or len(rows) > STAGED_ROWS or store.size > self.capacity:
            return None
        return rows

    def _copy_rows(self, store: ExpertMapStore, rows: list[int]) -> None:
        """Rows `rows` (at most `STAGED_ROWS`) of `store` into the copy: gathered into pinned host
        buffers, copied to the device asynchronously, scattered by `index_copy_`."""
        n, L, E = len(rows), self.geometry.num_layers, self.geometry.num_experts
        dev = self.maps.device
        if self._stage is None:
            pin = dev.type == "cuda"
            with torch.inference_mode(False):  # made during generate; written by any later sync
                host = (
                    torch.zeros(STAGED_ROWS, L, E, pin_memory=pin),
                    torch.zeros(STAGED_ROWS, L, pin_memory=pin),
                    torch.zeros(STAGED_ROWS, dtype=torch.int64, pin_memory=pin),
                )
                self._stage = host + tuple(torch.empty_like(t, device=dev) for t in host)
        hm, hn, hi, dm, dn, di = self._stage
        if self._staged is not None:
            self._staged.synchronize()  # the previous copies have left the host buffers
        idx = torch.tensor(rows)
        torch.index_select(store.maps, 0, idx, out=hm[:n])  # the store's row-major maps [n, L, E]
        hn[:n].copy_(torch.from_numpy(store.clipped_norms()[:, rows].T))  # [n, L]
        hi[:n].copy_(idx)
        with torch.no_grad():
            dm[:n].copy_(hm[:n], non_blocking=True)
            dn[:n].copy_(hn[:n], non_blocking=True)
            di[:n].copy_(hi[:n], non_blocking=True)
            self.maps.index_copy_(1, di[:n], dm[:n].transpose(0, 1))
            self.norms.index_copy_(1, di[:n], dn[:n].transpose(0, 1))
        if dev.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()

    def begin(self) -> None:
        """A new iteration: the running sums start from zero."""
        self.dot.zero_()
        self.packed.zero_()

    def step(self, layer: int, probs: torch.Tensor) -> None:
        """Add layer `layer`'s router probabilities `probs` ([E] or [1, E], any float dtype, on the
        planner's device); `packed` and `row` then hold the best match over layers 0..`layer`
        (`TrajectoryQuery.best` of every stored row). Layers must arrive in order after `begin`."""
        self._row_in_packed = False
        p = probs.reshape(-1)
        if p.dtype != torch.float32:
            p = self.p
            p.copy_(probs.reshape(-1))
        self.dot.addmv_(self.maps[layer], p)
        self.q_sq.addmv_(p.view(1, -1), p)  # += p . p
        torch.div(self.dot, self.norms[layer], out=self.ratio)
        torch.max(self.ratio, 0, keepdim=True, out=(self.best, self.row))  # the first of equal maxima
        self.packed[1:2].copy_(self.row)

    def bind_logits(self, logits: list[torch.Tensor | None]) -> None:
        """The routers' logits `catch_up` reads: per layer a contiguous [E] or [1, E] tensor on the
        planner's device at a fixed address (a captured decode step's static output), one dtype;
        None for a layer no catch-up reaches. Not while a graph is captured (copies the table)."""
        given = [t for t in logits if t is not None]
        if len(logits) != self.geometry.num_layers or not given:
            raise ValueError(f"bind_logits: {len(logits)} layers given, {self.geometry.num_layers} expected")
        E = self.geometry.num_experts
        for t in given:
            if t.numel() != E or not t.is_contiguous() or t.dtype != given[0].dtype or t.device != self.maps.device:
                raise ValueError("bind_logits: each layer's logits must be [E] contiguous, of one dtype, on the device")
        ptrs = [0 if t is None else t.data_ptr() for t in logits]
        self.table.copy_(torch.tensor(ptrs, dtype=torch.int64))
        self._like, self._bound = given[0], list(logits)
        # the last layer of the bound prefix: a catch-up may not reach a layer with no logits (address 0)
        self._bound_through = next((i for i, t in enumerate(logits) if t is None), len(logits)) - 1

    def restart(self) -> None:
        """A new iteration for `catch_up`: its running sums start from zero at layer 0 (on the
        current stream; capturable)."""
        self.state.fill_(-1)

    def catch_up(self, last: int, **knobs: int) -> None:
        """`step` of every layer after the last one in the sums through layer `last`, from the bound
        logits (`bind_logits`), in one fused kernel (`fused_match`; Triton on CUDA): the same
        running sums, per layer's `packed` in `rows` [L, 3] and the latest in `packed` (not
        `ratio`; `row` is taken from `packed` by the next `plan`). Nothing is recomputed when the
        sums reach `last` already; `restart` begins an iteration. `knobs`: `fused_match.catch_up`'s tile
        overrides (a probe's)."""
        if self._like is None:
            raise RuntimeError("catch_up before bind_logits")
        if last > self._bound_through:
            raise ValueError(f"catch_up through layer {last}: the logits are bound through {self._bound_through}")
        catch_up(
            self.table, self._like, self.maps, self.norms, self.dot, self.rows, self.packed, self.state, last, **knobs
        )
        self._row_in_packed = True

    def plan(self, target: int, slots: torch.Tensor | None = None) -> None:
        """δ selection from the matched row's map at layer `target` (after `step`): `planned` the
        experts selected (at least k; none when the score is below `min_score`), `needed` those
        whose slot in `slots` ([E] the device slot table's row of `target`, -1: not resident) is
        -1 (all of them without `slots`), `probs` the row's probabilities."""
        E = self.geometry.num_experts
        if self._row_in_packed:  # after a fused step: its row is only in `packed`
            self.row.copy_(self.packed[1:2])
            self._row_in_packed = False
        torch.div(self.best, self.q_sq.clamp_min(0.0).sqrt().clamp_min(EPS), out=self.score)
        torch.index_select(self.maps[target], 0, self.row, out=self.probs.view(1, E))
        torch.sort(self.probs, descending=True, stable=True, out=(self._sorted, self._order))  # ties: lower id
        torch.cumsum(self._sorted, 0, out=self._cum)
        delta = (1.0 - self.score).clamp(0.0, 1.0)  # [1]
        if self.rule == "paper":
            count = (self._cum < delta - TIE_EPS).sum() + 1
        elif self.rule == "demo":
            count = (self._cum <= delta + TIE_EPS).sum()
        else:
            count = torch.zeros((), dtype=torch.int64, device=self._cum.device)
        count = count.clamp(min=self.top_k, max=E)
        torch.lt(self._rank, count, out=self._take)  # [E] in sorted order
        if self.min_score > 0:
            self._take.logical_and_(self.score >= self.min_score)
        self.planned.scatter_(0, self._order, self._take)
        if slots is None:
            self.needed.copy_(self.planned)
        else:
            torch.logical_and(self.planned, slots.reshape(-1) < 0, out=self.needed)

    def read(self) -> DevicePlan:
        """The latest `step` and `plan` on the host (syncs: for tests and the first host path)."""
        planned, needed = self.planned.cpu(), self.needed.cpu()
        score, row = packed_score(self.packed.cpu().numpy())
        return DevicePlan(
            score=score,
            row=row,
            planned=planned.nonzero().view(-1).tolist(),
            needed=needed.nonzero().view(-1).tolist(),
            probs=self.probs.cpu().tolist(),
        )


class DeviceMatches:
    """The engine's side of `search="device"`: a `DevicePlanner` over the engine's map store, and
    a pinned host buffer [L, 3] of each layer's `packed` match that the side graphs fill.

    Layer l's match is captured into layer l's side graph, replayed on a side stream once the
    segment after router l is launched (it overlaps layer l's experts and layer l+1's attention;
    `graphs.StaticDecoder`), so the host finds it with layer l+1's routing (`match` waits for it
    through `settle`): the predictor plans from the match one layer behind (`trajectory_lag=1`).
    `iteration` names the step whose matches the buffer holds (-1: none; eager steps keep the host
    search)."""

    def __init__(self, planner: DevicePlanner, store: ExpertMapStore, distance: int) -> None:
        self.planner, self.store, self.distance = planner, store, distance
        L = planner.geometry.num_layers
        # the last layer whose match a plan reads: layer m plans target m + distance from match(m - 1)
        self.through = L - 2 - distance
        pin = planner.maps.device.type == "cuda"
        self.host = torch.zeros(L, 3, pin_memory=pin)  # [L, packed]: (best ratio, row, squared norm)
        self._np: np.ndarray = self.host.numpy()
        self.iteration = -1
        self.steps = 0  # graphed steps matched on the device
        # the match step as one fused kernel where it can run (Triton on CUDA) and the family's
        # routing is a softmax (`SideGraphs` checks that); False: the torch ops (an A/B knob)
        experts = planner.geometry.num_experts
        self.fused = fused_match.available(planner.maps.device) and experts <= fused_match.MAX_EXPERTS
        # set while a graphed step replays: settle(l) waits until layer l's match is in `host`
        self.settle: Callable[[int], None] | None = None
        self.rows_copied = 0  # store rows copied to the device after the first load
        # the predictor reads every layer's match, launched or not (map-aware eviction's hints): no
        # match may be deferred (`SideGraphs.match_needed`)
        self.reads_every_layer = False

    def wants(self, layer: int) -> bool:
        """Whether a plan reads layer `layer`'s match (later layers' matches are not computed)."""
        return layer <= self.through

    def capture_layer(self, layer: int, probs: torch.Tensor) -> None:
        """Record layer `layer`'s match (on the capturing stream): `probs` [1, E] its router's
        probabilities on the device. Layer 0 restarts the running sums."""
        if layer == 0:
            self.planner.begin()
        self.planner.step(layer, probs)
        self.host[layer].copy_(self.planner.packed, non_blocking=True)

    def capture_catch_up(self, layer: int) -> None:
        """`capture_layer` of a softmax-routed family through the fused catch-up (`fused`; the logits
        bound with `planner.bind_logits`): the matches of every layer after the last one in the
        sums through `layer`, and the host rows through `layer` (earlier rows are rewritten with
        the values they hold). `planner.restart` begins each step."""
        self.planner.catch_up(layer)
        self.host[: layer + 1].copy_(self.planner.rows[: layer + 1], non_blocking=True)

    def before_step(self, iteration: int, copy: bool = True) -> None:
        """A graphed decode step of `iteration` is about to replay: the store's copy made current
        now, or with `copy` False by the caller's `sync_store` before the step's first match."""
        self.iteration = iteration
        self.steps += 1
        if copy:
            self.sync_store()

    def sync_store(self) -> None:
        """The store's copy made current (its new rows, or the whole store; on the current stream)."""
        first = self.planner.version < 0
        copied = self.planner.sync(self.store)
        if not first:
            self.rows_copied += copied

    def after_step(self) -> None:
        """The step ended (or failed): no later event may read its matches."""
        self.iteration = -1

    def match(self, layer: int) -> tuple[float, int]:
        """The best (score, row) through layer `layer` of the current graphed step (its segment
        after router `layer` has completed)."""
        if self.settle is not None:
            self.settle(layer)
        return packed_score(self._np[layer])
