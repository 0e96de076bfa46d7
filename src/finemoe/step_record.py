"""A graphed decode step's expert map, made on the device: every MoE layer's router probabilities in
one copy to the host, for the map store's online learning (`history.HistoryRecorder`).

Without it a learning engine brings each router's logits to the host and turns them into
probabilities there, layer by layer: on the H200 machine ~30 µs of host time per layer (a pinned
copy, the family's probability function, the bookkeeping), ~1 ms per step of the reference shape,
on a host that is the step's bottleneck at a near-full budget (`docs/design/device_plans.md`,
"Session 40"). Here one small CUDA graph, captured with the step's segments, reads the routers'
static logits, applies the family's probability function (once over the stacked layers where it
treats rows alike, else per layer) and copies the float32 result to pinned host memory. It is
replayed on a stream of its own when the host reads the last layer's routing (the router is done
by then, so it runs at once, beside the last segment); the recorder reads it at the insert, in the
next step (`later`; `take` waits at once, as before session 45).
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
        # the next step's segments wait for a launched record on the GPU (`before_step`); False only as a
        # benchmark's probe (`predictor_overhead.py`'s `no-record-wait`: the record may then read router
        # outputs the next step rewrote, so stored maps may be wrong; tokens stay exact)
        self.wait_next = True

    @property
    def live(self) -> bool:
        return self.graph is not None

    def drop(self) -> None:
        """Forget the graph (the graphs are recaptured). A record launched and not read yet finishes
        first; a reader of it (`later`) still reads its buffer, which it holds."""
        if self.launched and self.graph is not None:
            self._done.synchronize()
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
                finally:
                    graph.capture_end()
        except Exception as exc:  # (an op the family's probability function runs cannot be captured)
            log.warning("the step's expert map cannot be recorded on the device, learning reads each layer: %r", exc)
            self.error = repr(exc)
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
        finally:
            torch.cuda.set_stream(self._compute)
        self.launched = True
        self.launches += 1

    def take(self) -> torch.Tensor:
        """The current step's probabilities [T, L, E] float32 on the host (a copy), the record
        launched now if `launch` did not, and waited for. Only after `mark` in the same step."""
        maps = self.later()()
        self.launched = False  # (read: the next step need not wait for it)
        return maps

    def later(self) -> Callable[[], torch.Tensor]:
        """`take` in two halves: the record launched now (behind the last router, `mark`), and a
        reader that waits for it and returns the step's probabilities [T, L, E] float32 (a host
        copy). The reader is valid until the next step's record is launched (it raises after; a
        recapture in between leaves it the old buffer), so a caller may read at the next step's
        start, where the GPU has that step's segments queued, instead of waiting at this step's end,
        where the GPU has nothing left (session 45)."""
        if not self.marked or self.host is None:
            raise RuntimeError("the step's expert map cannot be recorded before its last router is launched")
        self.launch()
        self.marked = False  # (`launched` stays: the next step's segments wait for the record, `before_step`)
        made, host = self.launches, self.host

        def read() -> torch.Tensor:
            if self.host is host and self.launches != made:  # (a recapture leaves `host` to this reader)
                raise RuntimeError("a step's expert map read after the next step's record was launched")
            t0 = time.perf_counter()
            self._done.synchronize()
            self.wait_s += time.perf_counter() - t0
            return host.transpose(0, 1).clone()

        return read

    def before_step(self, compute: torch.cuda.Stream) -> None:
        """A replayed step starts on `compute`: a mark of an earlier step is void, and a record it
        launched and nobody read must finish reading the router outputs this step rewrites."""
        if self.launched and self.wait_next:
            compute.wait_event(self._done)
        self.marked = self.launched = False
