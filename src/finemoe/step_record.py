"""A graphed decode step's expert map, made on the device: every MoE layer's router probabilities in
one copy to the host, for the map store's online learning (`history.HistoryRecorder`).

Without it a learning engine brings each router's logits to the host and turns them into
probabilities there, layer by layer: on the H200 machine ~30 µs of host time per layer (a pinned
copy, the family's probability function, the bookkeeping), ~1 ms per step of the reference shape,
on a host that is the step's bottleneck at a near-full budget (`docs/design/device_plans.md`,
"Session 40"). Here one small CUDA graph, captured with the step's segments, reads the routers'
static logits, applies the family's probability function (once over the stacked layers where it
treats rows alike, else per layer) and copies the float32 result to pinned host memory. It is
replayed on a stream of its own when the host reads the last layer's routing (`take`: the router
is done by then, so it runs at once, beside the last segment) and waited for there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from finemoe.models.base import sigmoid_probs, softmax_probs

log = logging.getLogger(__name__)

ROW_WISE = (softmax_probs, sigmoid_probs)  # probability functions that ignore the router module
EPS = 1e-12  # (as `expert_map.EPS`)


class InsertScores:
    """A full map store's insert scored on the device (batch 1): the redundancy [C] of the step's map
    and token embedding against every row of the store's device mirror (`device_plans.DevicePlanner`:
    maps, prefix norms, unit embeddings), the formula of `ExpertMapStore.redundancy` in float32, in
    a small graph of its own replayed right after the step record on the record's stream and copied
    to pinned host memory. Nothing waits for it in the step: the held-back insert, at the next step's
    start, reads it (`read`, by then long done), takes the argmax and writes the row, instead of two
    products over the stored rows on the forward thread (~0.2 ms on the H200 host, session 44). The
    device rounds its sums differently: at a near-tie it may pick another row than the host would.

    Valid for a step only if its embedding was staged (`stage`); the mirror's version is read at the
    launch, and the store uses the scores only at that version and weight."""

    def __init__(self, planner, weight: float) -> None:  # type: ignore[no-untyped-def]
        self.planner, self.weight = planner, weight
        dev = planner.maps.device
        L, E = planner.geometry.num_layers, planner.geometry.num_experts
        self.emb = torch.zeros(1, planner.geometry.dim, device=dev)  # [1, D] the step's token embedding (static)
        self.q = torch.zeros(L, E, device=dev)  # [L, E] the step's map, written by the record's graph
        with torch.inference_mode(False):  # (pinned rows written by every later replay)
            self.host = torch.zeros(planner.capacity, pin_memory=dev.type == "cuda")  # [C]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.done = torch.cuda.Event()  # the scores have landed in `host`
        self.staged = False  # this step's embedding is in `emb`
        self.launched = False  # replayed, maybe still running (the next step's inputs wait for it)
        self.version = -1  # the store version the launched scores were made against (-1: none valid)
        self.size = 0
        self.scored = 0  # steps whose scores were read, in total

    def stage(self, emb: torch.Tensor) -> None:
        """The step's token embedding [1, D] (device) into the static input, on the current stream."""
        self.emb.copy_(emb.reshape(1, -1))
        self.staged = True

    def capture(self, stream: torch.cuda.Stream) -> None:
        """Capture the scoring graph on `stream` (after the record's, which writes `q`)."""
        p, w = self.planner, self.weight
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                q = self.q
                maps = torch.einsum("lce,le->c", p.maps, q) / (p.norms[-1] * q.norm().clamp_min(EPS))  # [C] cos
                e = self.emb[0]
                sem = p.emb_unit @ (e / e.norm().clamp_min(EPS))  # [C] cosine
                self.host.copy_(w * sem + (1 - w) * maps, non_blocking=True)
            finally:
                graph.capture_end()
        self.graph = graph

    def launch(self, stream: torch.cuda.Stream) -> None:
        """Replay the scores on `stream` (current), after the record and the mirror's latest row
        copies; valid if the embedding was staged this step."""
        p = self.planner
        if self.graph is None:
            return
        if p._staged is not None:
            stream.wait_event(p._staged)
        self.graph.replay()
        self.done.record(stream)
        self.launched = True
        self.version, self.size = (p.version, p.size) if self.staged else (-1, 0)
        self.staged = False

    def take(self) -> tuple[int, float, Callable[[], torch.Tensor]] | None:
        """(store version, semantic weight, a reader of RDY [size]) of the step's scores, or None."""
        if self.version < 0:
            return None
        version, size = self.version, self.size
        self.version = -1

        def read() -> torch.Tensor:
            self.done.synchronize()  # (launched a step ago: done)
            self.scored += 1
            return self.host[:size].clone()

        return version, self.weight, read

    def before_step(self, compute: torch.cuda.Stream) -> None:
        """The next step's staging and row copies rewrite this graph's inputs: they wait for it."""
        if self.launched:
            compute.wait_event(self.done)
            self.launched = False


class StepRecord:
    """The step's router probabilities [L, T, E] float32 in pinned host memory, written by one CUDA
    graph per captured decode step (`capture`), replayed and read by `take` once `mark` has seen
    the last router launched."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.host: torch.Tensor | None = None  # [L, T, E] float32, pinned
        self._ready = torch.cuda.Event()  # the compute stream past the last router
        self._done = torch.cuda.Event()  # the record's copy has landed
        self.marked = False  # the current step's last router is launched (`mark`), its map not read yet
        self.launched = False  # the current step's record is replayed (`launch`), not read yet
        self.wait_s = 0.0  # host seconds `take` waited for the record, in total
        self._compute: torch.cuda.Stream | None = None  # the stream `mark` saw
        self.launches = 0  # steps recorded, in total
        self.error: str | None = None  # why the capture failed (the recorder then reads layer by layer)
        # set before the capture: a full store's insert scored in the same graph (batch 1; None: on the host)
        self.insert: InsertScores | None = None
        self.score_inserts = True  # False: no `insert` (an A/B knob)

    @property
    def live(self) -> bool:
        return self.graph is not None

    def drop(self) -> None:
        self.graph, self.host, self.marked, self.launched = None, None, False, False

    def capture(
        self,
        routed: list[tuple[nn.Module, tuple, tuple]],
        logits_at: int,
        router_probs: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        capturing: torch.cuda.Stream,
    ) -> bool:
        """Capture the record over the segments' static router outputs (`routed`: per MoE layer the
        router, its inputs and outputs; the logits at `logits_at`) after the segments' capture on
        `capturing`. False (and the reason in `error`): no record, the recorder reads layer by layer."""
        self.drop()
        logits = [out[logits_at] for _, _, out in routed]
        L, E = len(logits), logits[0].shape[-1]
        T = logits[0].reshape(-1, E).shape[0]
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(capturing)
        try:
            with torch.inference_mode(False):  # (pinned rows written by every later replay)
                host = torch.empty(L, T, E, dtype=torch.float32, pin_memory=True)
            with torch.no_grad(), torch.cuda.stream(self.stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    if router_probs in ROW_WISE:  # one call over every layer's rows
                        stacked = torch.stack([x.reshape(T, E) for x in logits]).view(L * T, E)
                        probs = router_probs(routed[0][0], stacked)
                    else:
                        pairs = zip(routed, logits, strict=True)
                        probs = torch.stack([router_probs(r, x.reshape(T, E)) for (r, _, _), x in pairs])
                    host.copy_(probs.view(L, T, E).float(), non_blocking=True)
                    if self.insert is not None and T == 1:
                        self.insert.q.copy_(probs.view(L, E).float())  # (the scores' graph reads it)
                finally:
                    graph.capture_end()
            if self.insert is not None and T == 1:
                try:
                    self.insert.capture(self.stream)
                except Exception as exc:  # (the record stands: the insert is then scored on the host)
                    log.warning("a graphed step's insert cannot be scored on the device: %r", exc)
                    self.insert = None
            else:
                self.insert = None
        except Exception as exc:  # (an op the family's probability function runs cannot be captured)
            log.warning("the step's expert map cannot be recorded on the device, learning reads each layer: %r", exc)
            self.error = repr(exc)
            self.insert = None
            return False
        capturing.wait_stream(self.stream)
        self.graph, self.host = graph, host
        return True

    def mark(self, compute: torch.cuda.Stream) -> None:
        """The segment holding the last router is launched on `compute`: the record may run once the
        work queued there so far is done. Only an event here: a graph launched now would sit on its
        stream waiting for most of the step, and the GPU's few hardware queues would hold later work
        of other streams behind it (the ids' and the embedding's copies landed ~3.8 ms late in a
        reference-shape step on the H200, session 41)."""
        self._ready.record(compute)
        self._compute = compute
        self.marked = True

    def launch(self) -> None:
        """Replay the record now, behind the last router (`mark`); nothing before `mark` or once
        launched. (`take` launches it: launched at the routing of the layer before the last instead,
        the step was no faster on the H200, session 41's s41d.)"""
        if not self.marked or self.launched or self.graph is None or self._compute is None:
            return
        self.stream.wait_event(self._ready)
        torch.cuda.set_stream(self.stream)  # (not a stream context: no lookup of the current stream)
        try:
            self.graph.replay()
            self._done.record(self.stream)
            if self.insert is not None:  # (after `_done`: `take` does not wait for the scores)
                self.insert.launch(self.stream)
        finally:
            torch.cuda.set_stream(self._compute)
        self.launched = True
        self.launches += 1

    def take(self) -> torch.Tensor:
        """The current step's probabilities [T, L, E] float32 on the host (a copy), the record
        launched now if `launch` did not, and waited for. Only after `mark` in the same step."""
        if not self.marked or self.host is None:
            raise RuntimeError("the step's expert map cannot be recorded before its last router is launched")
        self.launch()
        self.marked = self.launched = False
        t0 = time.perf_counter()
        self._done.synchronize()
        self.wait_s += time.perf_counter() - t0
        return self.host.transpose(0, 1).clone()

    def take_scores(self) -> tuple[int, float, Callable[[], torch.Tensor]] | None:
        """After `take`: the step's insert scores (`InsertScores.take`), or None."""
        return self.insert.take() if self.insert is not None else None

    @property
    def scores_inserts(self) -> bool:
        return self.insert is not None

    def before_step(self, compute: torch.cuda.Stream) -> None:
        """A replayed step starts on `compute`: a mark of an earlier step is void, and a record it
        launched and nobody read must finish reading the router outputs this step rewrites."""
        if self.launched:
            compute.wait_event(self._done)
        if self.insert is not None:
            self.insert.before_step(compute)
        self.marked = self.launched = False
