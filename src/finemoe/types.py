"""Typed values that cross module boundaries.

Axis letters used project-wide: T tokens, L MoE layers, E experts per layer, k top-k, H hidden,
I expert intermediate size, S cache slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch


class ExpertId(NamedTuple):
    """One routed expert: `layer` is the MoE-layer ordinal (0..L-1), not the decoder-layer index."""

    layer: int
    expert: int


def expert_id_table(num_layers: int, num_experts: int) -> list[list[ExpertId]]:
    """[L][E]: every expert's `ExpertId`, made once by the hot-path code that hands them out
    (indexing a list beats constructing a named tuple per use)."""
    return [[ExpertId(layer, e) for e in range(num_experts)] for layer in range(num_layers)]


@dataclass(frozen=True)
class ExpertPart:
    """One tensor of an expert, e.g. `gate_up_proj` of shape (2I, H), as the experts module holds it."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MoESpec:
    """The expert geometry of a model; everything the cache, policies and simulator need to know.

    Invariants: `len(moe_layers) == num_layers`; every expert of every MoE layer has the same
    `parts`, so one slot of the device pool fits any expert.
    """

    model_type: str
    moe_layers: tuple[int, ...]  # decoder-layer index of each MoE layer, ascending
    num_experts: int  # E, routed experts per MoE layer
    top_k: int  # k, experts each token uses per MoE layer
    hidden_size: int  # H
    intermediate_size: int  # I, per routed expert
    parts: tuple[ExpertPart, ...]
    dtype: torch.dtype
    num_decoder_layers: int
    shared_expert_intermediate_size: int = 0  # always-resident shared experts, 0 if none

    @property
    def num_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.moe_layers)

    @property
    def num_total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def expert_numel(self) -> int:
        return sum(p.numel for p in self.parts)

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * self.dtype.itemsize

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_total_experts


class PrefetchRequest(NamedTuple):
    """One expert a predictor wants resident, with a priority (higher is sooner)."""

    expert: ExpertId
    priority: float


class PrefetchPlan(NamedTuple):
    """What a predictor asks for after an event; the prefetcher decides how and when to move it.

    `replace` drops earlier plans that have not started yet. `iteration` (>= 0) marks the plan as
    meant for that iteration: the prefetcher drops it once a later iteration starts, and skips
    requests for layers that iteration has already passed. `layer_probs` carries, per target
    layer, the predicted probability of every expert [E] (map-aware eviction reads it).

    Immutable. A named tuple, not a frozen dataclass: the replay makes ~3 per layer-step, and a
    frozen dataclass's constructor takes 1.2 µs against 0.3 (issue 5's replay speed).
    """

    requests: tuple[PrefetchRequest, ...]
    replace: bool = False
    iteration: int = -1
    layer_probs: tuple[tuple[int, torch.Tensor], ...] = ()  # (layer, p [E] float32 CPU)


class StepMaps(Protocol):
    """A replayed step's expert map recorded on the device (`step_record.StepRecord`)."""

    def take(self) -> torch.Tensor: ...

    def later(self) -> Callable[[], torch.Tensor]: ...


@dataclass
class IterationContext:
    """What is known when an iteration starts (after the embedding layer ran).

    The iteration runs a [B, T] block of tokens; `rows` [N] indexes the flattened B*T positions
    that carry real tokens (prompt tokens in prefill, unfinished sequences in decode),
    `request_of_row` [N] names each row's sequence (0..B-1), and `embeddings` [N, D] are those
    tokens' embedding-layer outputs on the compute device (None when no predictor asked for
    them); `host_embeddings()` gives them as float32 on the CPU (copied once, by whichever thread
    asks first).

    Request identity. With `request_ids` None (static batches, `Engine.generate`), batch row b is
    request b and a prefill iteration starts a new batch. A continuous-batching scheduler sets
    `request_ids` [B] (the stable id of each batch row; prefill and decode iterations may hold
    different requests) and `finished_ids` (requests that left the batch since the previous
    iteration: their request-level state may be committed).
    """

    iteration: int
    is_prefill: bool
    batch_size: int
    rows: torch.Tensor  # [N] int64, CPU
    request_of_row: torch.Tensor  # [N] int64, CPU
    embeddings: torch.Tensor | None = None  # [N, D], compute device
    _host: torch.Tensor | None = field(default=None, repr=False)
    request_ids: tuple[int, ...] | None = None  # [B] stable id per batch row; None: the row index
    finished_ids: tuple[int, ...] = ()  # requests that left the batch before this iteration
    # a replayed decode step whose expert map the device records (`step_record.StepRecord`): `take()`
    # gives the router probabilities of every layer [B*T, L, E] float32 on the host, once, at the last
    # layer's routing (`later()`: a reader for the next step's start); None: read each layer's routing
    step_maps: StepMaps | None = None
    _rows_list: list[int] | None = field(default=None, repr=False)

    def row_list(self) -> list[int]:
        """`rows` as plain ints [N] (made once; a producer may pass them as `_rows_list`)."""
        if self._rows_list is None:
            self._rows_list = self.rows.tolist()
        return self._rows_list

    def host_embeddings(self) -> torch.Tensor | None:
        if self._host is None and self.embeddings is not None:
            self._host = self.embeddings.float().cpu()
        return self._host

    @property
    def batch_request_ids(self) -> tuple[int, ...]:
        """The stable id of every batch row [B] (the row index when none were given)."""
        return self.request_ids if self.request_ids is not None else tuple(range(self.batch_size))

    @property
    def starts_batch(self) -> bool:
        """A static-batch prefill: every request of the previous batch has finished."""
        return self.is_prefill and self.request_ids is None


@dataclass
class RoutingEvent:
    """The router of MoE layer `layer` ran in iteration `iteration`.

    `probs` holds the full router probabilities over all E routed experts [T, E] (T = B*T_block,
    every position including padding) — or, when `to_probs` is set, the raw router logits on the
    compute device, turned into probabilities by `host_probs()` on first use (so the forward
    thread can hand them to the searcher thread without a softmax or a device sync). In a graphed
    decode step where no reader wants probabilities (`predictor.reads_router_probs`), the logits
    stay on the device: the step's static router output, valid until the next step's replay.
    `topk_ids` are the selected experts, int64 [T, k], on the CPU. `hidden` is the router's input
    [T, H] on the compute device (read only by speculative predictors, synchronously).
    `speculated` maps a later layer to its router's output on this layer's router input [T, E]
    (CPU), where the forward pass computed it already: a speculative gate then only turns it into
    probabilities with `speculated_probs(layer, values)`, which whoever sets `speculated` sets too
    (logits take `RouterGate.probs_of`). Graphed decode computes the probabilities themselves,
    float32, in pinned rows the next step rewrites: for a reader on the forward thread `speculated`
    holds those rows and `speculated_probs` waits for them and returns a copy (a float32 NumPy
    array for the row itself; read them during the step: a later read raises); a searcher thread
    gets copies and the identity.
    """

    iteration: int
    layer: int
    probs: torch.Tensor  # [T, E] (or [..., E]): probabilities, or logits when `to_probs` is set
    topk_ids: torch.Tensor  # [T, k] int64, CPU
    is_prefill: bool
    hidden: torch.Tensor | None = None  # [T, H], compute device
    to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None
    _host: torch.Tensor | None = field(default=None, repr=False)
    speculated: dict[int, torch.Tensor] | None = None  # target layer -> router output [T, E], CPU
    # (layer, output) -> [T, E], a tensor or (graphed rows) a float32 NumPy array
    speculated_probs: Callable[[int, torch.Tensor], torch.Tensor | np.ndarray] | None = None
    _host_np: np.ndarray | None = field(default=None, repr=False)
    _topk_list: list[list[int]] | None = field(default=None, repr=False)
    # MoE layers up to this one have their experts' compute launched already (a graphed step read
    # this routing after running ahead of it, `runahead`): a plan for them cannot help, so a
    # predictor may skip making one (-1: none launched; a worker process's events do not carry it)
    launched: int = -1

    def host_probs(self) -> torch.Tensor:
        """Router probabilities [T, E], float32 on the CPU (computed once)."""
        if self._host is None:
            raw = self.probs.reshape(-1, self.probs.shape[-1])
            p = self.to_probs(raw) if self.to_probs is not None else raw
            self._host = p.float().cpu()
        return self._host

    def host_probs_np(self) -> np.ndarray:
        """`host_probs()` as a NumPy array [T, E] float32, the same memory (made once: a tensor's
        `numpy()` costs ~0.7 µs, a per-layer cost of the batch-1 predictors)."""
        if self._host_np is None:
            self._host_np = self.host_probs().numpy()
        return self._host_np

    def topk_lists(self) -> list[list[int]]:
        """`topk_ids` as nested lists [T][k] of plain ints (made once)."""
        if self._topk_list is None:
            self._topk_list = self.topk_ids.tolist()
        return self._topk_list


@dataclass
class CacheStats:
    """Counters of the expert cache. Hits + misses == accesses; bytes in bytes, times in seconds."""

    num_layers: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    demand_bytes: int = 0
    stall_s: float = 0.0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    prefetches_wasted: int = 0  # evicted before any use
    prefetch_wasted_bytes: int = 0
    prefetches_late: int = 0
    prefetches_dropped: int = 0  # planned but never started (stale or replaced)
    gathered: int = 0  # copies keeping the layers before the sink layers whole (`gather_absent`), not prefetches
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layer_hits:
            self.layer_hits = [0] * self.num_layers
        if not self.layer_misses:
            self.layer_misses = [0] * self.num_layers

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def layer_hit_rate(self) -> list[float]:
        return [h / (h + m) if h + m else 0.0 for h, m in zip(self.layer_hits, self.layer_misses, strict=True)]

    @property
    def prefetch_precision(self) -> float:
        """Share of issued prefetches that a router later used while still resident."""
        return self.prefetches_used / self.prefetches_issued if self.prefetches_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the experts that had to come in (not resident from earlier use) that a
        prefetch brought in: used / (used + misses not covered by a late prefetch)."""
        need = self.prefetches_used + self.misses - self.prefetches_late
        return self.prefetches_used / need if need > 0 else 0.0

    @property
    def demand_bandwidth_gbps(self) -> float:
        """On-demand copy bandwidth in GB/s (1e9 bytes), over the measured stall time."""
        return self.demand_bytes / self.stall_s / 1e9 if self.stall_s > 0 else 0.0

    def copy(self) -> CacheStats:
        return CacheStats(**{k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()})

    def minus(self, before: CacheStats) -> CacheStats:
        """Counters accumulated since `before` (a copy taken earlier)."""
        out = self.copy()
        for k, v in self.__dict__.items():
            if isinstance(v, list):
                setattr(out, k, [a - b for a, b in zip(v, getattr(before, k), strict=True)])
            elif k != "num_layers":
                setattr(out, k, v - getattr(before, k))
        return out

    def to_dict(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "evictions": self.evictions,
            "bytes_copied": self.bytes_copied,
            "demand_bytes": self.demand_bytes,
            "stall_s": self.stall_s,
            "demand_bandwidth_gbps": self.demand_bandwidth_gbps,
            "prefetches_issued": self.prefetches_issued,
            "prefetches_used": self.prefetches_used,
            "prefetches_wasted": self.prefetches_wasted,
            "prefetch_wasted_bytes": self.prefetch_wasted_bytes,
            "prefetches_late": self.prefetches_late,
            "prefetches_dropped": self.prefetches_dropped,
            "gathered": self.gathered,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "layer_hit_rate": self.layer_hit_rate,
        }
