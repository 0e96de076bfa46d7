"""Batch-1 decode steps replayed from CUDA graphs, with the offloading decisions still made per layer.

A decode step of transformers' modeling code costs far more host time than GPU time (on the H200
a Qwen3-30B-A3B token takes ~50 ms of Python around ~2 ms of kernels, `docs/results/gpu_trace.md`).
CUDA graphs replay the kernels without the Python, but an offloading engine must look at every
layer's routing on the host before that layer's experts run. So the step is cut at the routers:

    S_0 = embeddings ... layer 0's attention and router
    S_l = layer l-1's experts (gathered from the slot pool through the device slot table), shared
          expert, residual, layer l's attention and router          (l = 1 .. L-1)
    S_L = the last layer's experts ... norm, lm_head, float32 logits

one CUDA graph each, all in one memory pool and replayed in capture order. Between S_l and S_l+1
the host does what an eager pass does at layer l: the router's forward hooks run on the router's
static outputs (a hook that returns new outputs has them copied into the static ones; finemoe's hook
syncs on the ids and copies the predictors' inputs to the host), the cache serves the layer (demand
loads on the copy stream, the compute stream waits for them) and S_l+1 is replayed where the eager
pass would compute the experts. Only then do the predictors see layer l's routing: their host work
overlaps S_l+1 on the GPU instead of delaying it (their inputs are host copies; their plans still
target later layers). With every expert resident and nothing else hooked on the routers the whole
step is one graph. The predictors' own device work at layer l (`search="device"`: the map match,
`device_plans.DeviceMatches`; `graph_gates`: the speculative gates) is a small graph of its own
(`side_graphs.SideGraphs`), replayed on a side stream once S_l+1 is launched, so the segments are
the same graphs with or without a predictor (their launch and GPU time included); the host waits
for it only before it reads its results, while the GPU runs S_l+1.

Needs a static KV cache (transformers `StaticCache`: fixed addresses, the write position a device
tensor advanced in place); the prefill runs eagerly into it. The first decode step of a new
configuration runs eagerly too (warm-up), the graphs are captured before the second and reused by
later requests while the cache is long enough. Without CUDA the same path runs every step eagerly
(the static cache only), which is how the CPU tests check it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import StaticCache

from finemoe.errors import ConfigError
from finemoe.loader import MoELayerRef
from finemoe.runahead import RunAhead
from finemoe.side_graphs import SideGraphs
from finemoe.step_record import StepRecord
from finemoe.store import flush_deferred

if TYPE_CHECKING:
    from finemoe.runtime import OffloadRuntime

log = logging.getLogger(__name__)

MIN_CACHE_TOKENS = 512  # static caches are made in powers of two from here
# Longer requests keep the dynamic cache: a static one is allocated whole up front (Qwen3-30B:
# 96 KiB per position, 0.8 GiB at 8K) and stays allocated between requests.
MAX_CACHE_TOKENS = 8192


class StaticDecoder:
    """Prefill and decode steps of one engine's model at batch 1 over a static KV cache, decode
    steps replayed from CUDA graphs once captured (CUDA devices; `use_graphs`)."""

    def __init__(
        self, model: nn.Module, runtime: OffloadRuntime, refs: list[MoELayerRef], device: torch.device
    ) -> None:
        self.model, self.rt, self.refs, self.device = model, runtime, refs, device
        self.use_graphs = device.type == "cuda"  # elsewhere: the static cache, every step eager
        self.max_len = 0
        self.cache: StaticCache | None = None
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)  # the decode step's token
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=device)  # its position
        self.stream = torch.cuda.Stream(device) if self.use_graphs else None
        # Graphs are captured on a stream of their own, never used for a host copy. A pinned host
        # tensor copied on `self.stream` and freed by another thread (the searcher) has torch's host
        # allocator record an event on `self.stream`; were that stream capturing, the event would
        # be recorded into the graph, and the allocator's next query of it fail with "invalid
        # argument" at an unrelated copy (seen in the GPU tests with search="async").
        self.capture_stream = torch.cuda.Stream(device) if self.use_graphs else None
        # the predictors' device work per MoE layer, beside the segments (`side_graphs`)
        self.sides = SideGraphs(runtime, len(refs), device) if self.use_graphs else None
        # layers whose experts are all resident launch their next segment without a routing sync
        self.ahead = RunAhead(runtime, len(refs), device) if self.use_graphs else None
        # the step's expert map for online learning, recorded on the device (`step_record`)
        self.record = StepRecord(device) if self.use_graphs else None
        self.foreign = False  # a router has hooks besides the engine's (set at capture): no run-ahead
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.routed: list[tuple[nn.Module, tuple, tuple] | None] = []  # per MoE layer: router, inputs, outputs
        self.logits: torch.Tensor | None = None  # [1, V] float32, written by the last graph
        # The greedy token of a replayed step: the last graph takes the logits' argmax and copies it
        # to pinned host memory, so the host waits for one event instead of launching the argmax and a
        # pageable copy after the step (`decode_token`; False: graphs captured without it, the argmax
        # taken on the host after the step, as before session 46)
        self.graph_argmax = True
        # [1] int64, pinned, written by the last graph; made here, never while a graph is captured (a
        # pinned allocation may query the events of freed blocks, illegal on a capturing thread)
        self._token_host: torch.Tensor | None = None
        self._token_view: np.ndarray | None = None  # its NumPy view (the host's read, no torch call)
        if self.use_graphs:
            with torch.inference_mode(False):  # (written by every later replay)
                self._token_host = torch.zeros(1, dtype=torch.long, pin_memory=True)
            self._token_view = self._token_host.numpy()
        self._token_done = torch.cuda.Event() if self.use_graphs else None
        self._token_ready = False  # the last `decode` replayed a graph that copied its token
        self._argmax_captured = False  # the graphs captured take the argmax (`graph_argmax` then)
        self.whole = False  # one graph for the step (nothing on the host between layers)
        self._pool = None
        self._warm = False  # an eager decode step ran with this cache (capture may follow)
        self.replays = 0  # decode steps replayed from graphs
        self.captures = 0
        self.error: str | None = None  # why capture failed (decoding went on eagerly)
        # host clock (s) at the last replay's end and around this step's `deferring_begin` (the
        # between-step spans, `OffloadRuntime.step_spans_s`)
        self._t_end = self._t_ret = self._t_fed = self._t_in = self._t_out = 0.0
        self._here: torch.cuda.Stream | None = None  # the replayed step's compute stream
        self._marked_last = False  # the last forward was a replayed step (`step_marks`: `feed` marks it)
        # Sliding-window cache layers keep their length in a Python int and branch on it: a graph
        # would replay the capture-time branch and never advance it. Such models keep the dynamic path.
        self.supported = static_decode_supported(model)
        if not self.supported:
            log.info("static KV cache / CUDA graphs off: the model has sliding-window attention layers")

    def stats(self) -> dict:
        return {
            "cuda_graphs": self.use_graphs and self.supported,
            "static_cache_tokens": self.max_len,
            "decode_graph_replays": self.replays,
            "decode_graph_captures": self.captures,
            "decode_graphs": len(self.graphs),
            "decode_graph_error": self.error,
            "decode_graph_gates": self.sides.gate_rows() if self.sides else 0,  # gate probability rows per step
            "decode_side_graphs": self.sides.count() if self.sides else 0,  # predictors' graphs per step
            # replayed steps whose expert map the device recorded for learning (`step_record`), in total
            "decode_step_records": self.record.launches if self.record else 0,
            "decode_step_record_wait_s": self.record.wait_s if self.record else 0.0,  # host seconds its reads waited
            # side launches without their gates, without their map match (deferred), and matches
            # launched only when read (`side_graphs.SideGraphs.match_needed` missed them), in total
            "decode_side_gates_skipped": self.sides.gates_skipped if self.sides else 0,
            "decode_side_matches_deferred": self.sides.matches_deferred if self.sides else 0,
            "decode_side_late_matches": self.sides.late_matches if self.sides else 0,
            # MoE layers of replayed steps launched without a routing sync (every expert resident, `runahead`)
            "decode_layers_run_ahead": self.rt.run_ahead_layers,
            # drained routings whose predictor work went after the sync layer's launch (`defer_drained_plans`)
            "decode_drained_plans_deferred": self.rt.drained_plans_deferred,
            # routing syncs that took ids copied before the host's work in front of them (`read_early`)
            "decode_early_routing_reads": self.rt.early_reads,
            # layers of replayed steps whose router logits were copied to the host (a reader wanted them)
            "decode_graph_logits_copies": self.rt.graphed_logits_copies,
            "table_rows_copied": self.rt.cache.table_rows_copied,  # device slot-table rows refreshed (all steps)
        }

    # -- cache ---------------------------------------------------------------------------------
    def fits(self, tokens: int) -> bool:
        """Whether a request of `tokens` positions (prompt + new tokens) runs over a static cache."""
        return self.supported and tokens <= MAX_CACHE_TOKENS

    def reserve(self, tokens: int) -> None:
        """Make the static cache hold at least `tokens` positions (a longer one drops the graphs)."""
        if tokens <= self.max_len:
            return
        size = MIN_CACHE_TOKENS
        while size < tokens:
            size *= 2
        self.drop_graphs()
        self.cache = StaticCache(config=self.model.config, max_cache_len=size)
        self.max_len = size
        log.info("static KV cache: %d positions", size)

    def drop_graphs(self) -> None:
        if self.sides is not None:
            self.sides.drop()  # (they write pinned rows and read tensors about to be freed)
        if self.record is not None:
            self.record.drop()
        self.graphs, self.routed, self.logits, self._pool, self._warm = [], [], None, None, False
        self._argmax_captured = self._token_ready = False

    @contextmanager
    def running(self) -> Iterator[None]:
        """The context generation runs in: graphs are captured and replayed on a side stream."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self.stream):
                self.rt.pin_stream(self.stream)
                yield
        finally:
            self.rt.pin_stream(None)
            if self.sides is not None:
                self.sides.finish()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            refresh = getattr(self.rt.cache.transfer, "refresh_stream", None)
            if refresh is not None:  # copies issued after generation (end of requests) switch back to
                refresh()  # the caller's stream, not to the side stream

    # -- steps -----------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Eager pass over the prompt `ids` [1, T] from position 0; next-token logits [1, V] float32."""
        assert self.cache is not None, "reserve() first"
        self.cache.reset()
        self._t_end = 0.0  # (no between-step span from the last request's end)
        self._marked_last = False
        if self.rt.step_marks is not None:
            self.rt.step_marks.cut()
        T = ids.shape[1]
        pos = torch.arange(T, device=self.device).view(1, T)
        return self._eager(ids, pos)

    @contextmanager
    def deferring_begin(self, decode: bool) -> Iterator[None]:
        """Around a step's `start_iteration`: a decode step that will be replayed holds its
        predictors' start back until S_0 is launched (`OffloadRuntime.begin_deferred`)."""
        self.rt.defer_begin = decode and self.use_graphs and bool(self.graphs)
        self._t_in = time.perf_counter()
        try:
            yield
        finally:
            self.rt.defer_begin = False
            self._t_out = time.perf_counter()

    def feed(self, token: int) -> torch.Tensor:
        """Put the next decode step's token in place; returns the input ids [1, 1] (static)."""
        marks = self.rt.step_marks  # (a measurement probe: where the host got the token, on the GPU's clock)
        if marks is not None and self._here is not None and self._marked_last:
            marks.mark(5, self._here)
        self.ids.fill_(token)
        self._t_fed = time.perf_counter()
        return self.ids

    def decode(self, position: int) -> torch.Tensor:
        """One decode step for the token `feed` put in place, at `position`; logits [1, V] float32
        (a static buffer when replayed: read it before the next step)."""
        self.pos.fill_(position)
        self._marked_last = self._token_ready = False
        if not self.graphs or not self.use_graphs:
            self.rt.begin_deferred()  # (none held: only a step with graphs holds it back)
        if not self.use_graphs:
            return self._eager(self.ids, self.pos)
        if not self.graphs:
            if not self._warm:
                self._warm = True
                return self._eager(self.ids, self.pos)
            try:
                self._capture()
            except Exception as exc:  # an op the model runs cannot be captured: stay eager, say why
                log.warning("decode graphs could not be captured, decoding eagerly: %r", exc)
                self.error, self.use_graphs = repr(exc), False
                return self._eager(self.ids, self.pos)
        self._replay()
        self._marked_last = self.rt.step_marks is not None
        if self._argmax_captured and self.graph_argmax:
            self._token_done.record(self._here)  # type: ignore[union-attr]  # (behind the token's copy)
            self._token_ready = True
        self.replays += 1
        self._t_ret = time.perf_counter()
        assert self.logits is not None
        return self.logits

    def decode_token(self, position: int) -> int:
        """`decode`, and its greedy token: the argmax of the step's logits (the lowest id among equal
        maxima), read from the copy the last graph made when the step was replayed (`graph_argmax`),
        else taken here."""
        logits = self.decode(position)
        if self._token_ready:
            self._token_done.synchronize()  # type: ignore[union-attr]
            return int(self._token_view[0])  # type: ignore[index]
        return int(logits.argmax(dim=-1)[0])

    def _eager(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].to(dtype=torch.float32)

    # -- capture ---------------------------------------------------------------------------------
    def _capture(self) -> None:
        rt, cache = self.rt, self.rt.cache
        L = len(self.refs)
        foreign = any(len(ref.router._forward_hooks) > 1 for ref in self.refs)  # e.g. benchmark routing replay
        self.foreign = foreign
        self.whole = cache.all_resident and not (self.rt.predictors or self.rt.observers) and not foreign
        if not cache.all_resident:
            for layer in range(L):
                cache.device_table(layer)  # no table row left dirty: the graphs read the rows in place
        sides = self.sides
        assert sides is not None
        here = torch.cuda.current_stream(self.device)
        cap = self.capture_stream
        assert cap is not None
        cap.wait_stream(here)
        torch.cuda.synchronize(self.device)
        sides.prepare(speculate=not self.whole and bool(rt.gate_strides))  # (the device is idle)
        self._pool = torch.cuda.graph_pool_handle()
        self.routed = [None] * L
        self.graphs = [torch.cuda.CUDAGraph()]
        rt.capture = self
        begun = False
        try:
            with torch.cuda.stream(cap):  # replays go on `here`; see `capture_stream`
                try:
                    self.graphs[0].capture_begin(pool=self._pool, capture_error_mode="thread_local")
                    begun = True
                    logits = self._eager(self.ids, self.pos)
                    if self.graph_argmax:
                        self._capture_argmax(logits)
                    self.graphs[-1].capture_end()
                    begun = False
                    if any(r is None for r in self.routed) or len(self.graphs) != (1 if self.whole else L + 1):
                        raise RuntimeError("decode graph capture did not see every MoE router once (unsupported model)")
                    if not self.whole:
                        sides.capture(self.routed, cap)  # type: ignore[arg-type]
                        self._capture_record(cap)
                except BaseException:
                    if begun:  # ended on the stream it began on, so `cap` is no longer capturing
                        with suppress(Exception):  # the capture already failed: report the first error
                            self.graphs[-1].capture_end()
                    self.drop_graphs()
                    raise
        finally:
            rt.capture = None
            flush_deferred()  # a store collected during the capture waited with its unregistration
            here.wait_stream(cap)
        self.logits = logits
        self._argmax_captured = self.graph_argmax
        self.captures += 1
        log.info(
            "decode step captured: %d CUDA graph(s) over %d MoE layers, %d predictor graph(s) beside them",
            len(self.graphs),
            L,
            sides.count(),
        )

    def _capture_argmax(self, logits: torch.Tensor) -> None:
        """In the last graph's capture: the greedy token of `logits` [1, V] (the lowest id among
        equal maxima, as `torch.argmax`) copied to the pinned [1] int64 buffer made at set-up."""
        assert self._token_host is not None
        self._token_host.copy_(logits.argmax(dim=-1), non_blocking=True)

    def _capture_record(self, cap: torch.cuda.Stream) -> None:
        """The step's expert map recorded on the device where a recorder learns on this thread; the
        recorders read every router's logits otherwise (and if the record cannot be captured)."""
        rt, record = self.rt, self.record
        assert record is not None
        live = bool(rt.map_recorders) and record.capture(
            self.routed,  # type: ignore[arg-type]
            rt.adapter.router_logits_at,
            rt.adapter.router_probs,
            cap,
        )
        for rec in rt.map_recorders:
            rec.graphed_reads_probs = not live

    def boundary(self, layer: int, module: nn.Module, args: tuple, output: tuple) -> None:
        """Called by layer `layer`'s router hook while capturing: keep its static inputs and
        outputs and, unless the step is one graph, start the next segment."""
        self.routed[layer] = (module, args, tuple(output))
        if self.whole:
            return
        self.graphs[-1].capture_end()
        graph = torch.cuda.CUDAGraph()
        self.graphs.append(graph)
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")

    # -- replay ----------------------------------------------------------------------------------
    def _replay(self) -> None:
        rt, cache = self.rt, self.rt.cache
        index_at = rt.adapter.router_index_at
        step_marks = rt.step_marks  # (a measurement probe, `step_marks`)
        if self.whole:
            # (`running` pins its stream: torch's lookup of the current stream costs ~10 µs of host)
            self._here = self.stream if rt.fixed_stream is self.stream else torch.cuda.current_stream(self.device)
            if step_marks is not None:
                step_marks.start(self._here, follows=True)
            self.graphs[0].replay()
            if step_marks is not None:
                step_marks.mark(2, self._here)
            rt.begin_deferred()
        else:
            matches = rt.device_matches
            side = self.sides
            assert side is not None
            late: list = []
            rt.late_events = late
            # (a paused duty leaves only the recorders, which read neither matches nor gates)
            sides = bool(rt.active) and rt.active is not rt.always and side.count() > 0
            rt.speculated = side.speculated if side.linear else None
            record = self.record if self.record is not None and self.record.live and rt.map_recorders else None
            rt.step_record = record
            rt.graphed_probs = rt.reads_graphed_probs()
            # (`running` pins its stream: torch's lookup of the current stream costs ~10 µs of host)
            here = self.stream if rt.fixed_stream is self.stream else torch.cuda.current_stream(self.device)
            self._here = here
            side.before_step(here)
            if record is not None:
                record.before_step(here)
            first = sides and side.first
            ahead = self.ahead if rt.run_ahead and not (self.foreign or rt.observers or rt.policy_routes) else None
            defer = ahead is not None and rt.defer_matches and rt.tell_launched  # (`SideGraphs.match_needed`)
            early = rt.early_routing_read  # (`OffloadRuntime.read_early`)
            # (a whole-store reload copies from pageable memory: before S_0, as the host would wait for it)
            beside = sides and rt.store_sync_beside and not (matches and matches.planner.full_load_due(matches.store))
            try:
                if sides and not beside:
                    self._begin_sides(here, False)
                t_step = time.perf_counter()
                if step_marks is not None:
                    step_marks.start(here, follows=True)
                marks = [0.0] * 5  # (the last routing sync's; `OffloadRuntime.sync_marks_s`)
                self.graphs[0].replay()
                if record is not None and len(self.refs) == 1:  # (S_0 holds the last router)
                    record.mark(here)
                self._span(t_step)
                if beside:  # while the GPU runs S_0: no match reads the store before router 0
                    self._begin_sides(here, True)
                if rt.embed_early:
                    rt.embed_held()  # (the predictors' start, held back, embeds its token from now)
                for layer, ref in enumerate(self.refs):
                    module, args, output = self.routed[layer]  # type: ignore[misc]
                    if ahead is not None:
                        if ahead.launch(
                            layer,
                            rt.binding_of(ref),
                            module,
                            args,
                            output,
                            self._replayer(layer + 1),
                            side if sides else None,
                            here,
                        ):
                            continue  # every expert of `layer` resident: no routing sync
                        if early and ahead.pending:  # its ids land while the host drains
                            rt.read_early(layer, output[index_at], here)
                        marks[0] = time.perf_counter()
                        ahead.drain(layer - 1, here)  # the routings skipped so far, before this layer's sync
                    marks[1] = time.perf_counter()
                    rt.begin_deferred()  # the predictors' start of the step, before its first routing
                    run_hooks(module, args, output)
                    marks[2] = time.perf_counter()
                    if first and side.due(layer):  # router `layer` is done: the GPU idles until the next launch
                        t0 = time.perf_counter()
                        side.launch(layer)
                        rt.critical_decode_s += time.perf_counter() - t0
                    rt.binding_of(ref).serve_graphed(output[index_at], self._replayer(layer + 1))
                    marks[3] = time.perf_counter()
                    if sides and side.due(layer):  # the GPU runs segment layer + 1: launch this layer's side
                        t0 = time.perf_counter()
                        side.launch(layer, match=not defer or side.match_needed(layer, cache.slot_of))
                        rt.critical_decode_s += time.perf_counter() - t0
                    if late:  # the predictors plan while the GPU runs the segment just replayed
                        t0 = time.perf_counter()
                        if early and layer + 1 < len(self.refs):  # the next router's ids land meanwhile
                            rt.read_early(layer + 1, self.routed[layer + 1][2][index_at], here)  # type: ignore[index]
                        for binding, *gathered in late:  # (what the router hook gathered)
                            rt.stepper.route(gathered[0] if binding is None else binding.routing_event(*gathered))
                        late.clear()
                        # start the plans now: the next layer's requests would be stale by its serve; the
                        # layer's demand copies a pause protects were issued before these
                        rt.prefetcher.resume()
                        rt.prefetcher.pump()
                        rt.critical_decode_s += time.perf_counter() - t0
                rt.begin_deferred()  # (every layer run ahead and none left to drain)
                if ahead is not None:
                    ahead.drain(len(self.refs) - 1)
                marks[4] = self._t_end = time.perf_counter()
                if step_marks is not None and sides and side.opened:
                    step_marks.mark(3, side.stream)  # (after every side graph the step launched)
                sums, counts = rt.sync_marks_s, rt.sync_marks_steps
                for i, m in enumerate(marks):
                    if m:
                        sums[i] += m - t_step
                        counts[i] += 1
            finally:
                rt.drop_deferred()  # (a failed step's start is dropped; after a normal step, none is held)
                rt.drop_early()  # (one nobody took: its layer ran ahead)
                if ahead is not None:
                    ahead.abandon()  # (nothing left unless the step failed)
                rt.late_events, rt.speculated, rt.settle_side, rt.step_record = None, None, None, None
                if matches is not None:
                    matches.after_step()
                    matches.settle = None
        if cache.all_resident:  # every use a hit; counted from one copy of all layers' ids
            ids = torch.stack([r[2][index_at] for r in self.routed]).cpu()  # type: ignore[index]
            for layer in range(len(self.refs)):
                cache.defer_access(layer, ids[layer])

    def _span(self, t_step: float) -> None:
        """Add this step's between-step spans to `OffloadRuntime.step_spans_s` (S_0 just launched;
        only when the last replay ended before this step's `deferring_begin`)."""
        end, ret, fed, t_in, t_out = self._t_end, self._t_ret, self._t_fed, self._t_in, self._t_out
        self._t_end = 0.0
        if not 0.0 < end <= ret <= fed <= t_in <= t_out <= t_step:
            return
        now, spans = time.perf_counter(), self.rt.step_spans_s
        spans[0] += ret - end
        spans[1] += fed - ret
        spans[2] += t_in - fed
        spans[3] += t_out - t_in
        spans[4] += t_step - t_out
        spans[5] += now - t_step
        self.rt.step_spans_steps += 1

    def _begin_sides(self, here: torch.cuda.Stream, beside: bool) -> None:
        """A replayed step's side graphs begin: the map store's new rows reach the device on `here`
        now (before S_0), or with `beside` on the side stream before the step's first side graph
        (`SideGraphs.begin_step`: the host copies them there, while the GPU runs the segments
        launched, not between S_0's launch and S_1's); the step's settle hooks are set."""
        rt, side, matches = self.rt, self.sides, self.rt.device_matches
        assert side is not None
        if matches is not None:  # a predictor cost per step
            t0 = time.perf_counter()
            matches.before_step(rt.iteration, copy=not beside)
            rt.critical_decode_s += time.perf_counter() - t0
        side.begin_step(here, matches.sync_store if beside and matches is not None else None)
        rt.settle_side = partial(side.settle, step=side.step)
        if matches is not None:
            matches.settle = partial(side.settle_match, step=side.step)

    def _replayer(self, segment: int) -> Callable[[], None]:
        replay, marks = self.graphs[segment].replay, self.rt.step_marks
        last = len(self.refs)
        record = self.rt.step_record if segment == last - 1 else None
        if record is not None:  # the segment holding the last router: the step's map may be recorded after it
            replay = partial(_replay_marked, replay, record, self._here)
        if marks is None or segment < last - 1:
            return replay
        slot, stream = segment - last + 2, self._here  # 1: the last router's segment, 2: the step's last

        def marked() -> None:
            if slot == 2:
                marks.mark(4, stream)  # (after any wait the serve put on the stream)
            replay()
            marks.mark(slot, stream)

        return marked


def _replay_marked(replay: Callable[[], None], record: StepRecord, here: torch.cuda.Stream) -> None:
    replay()
    record.mark(here)


def static_decode_supported(model: nn.Module) -> bool:
    """Whether `model`'s decode steps can run over a static KV cache (and so be graphed): not with
    sliding-window cache layers, which keep their length in a Python int and branch on it (a graph
    would replay the capture-time branch and never advance it)."""
    probe = StaticCache(config=model.config, max_cache_len=MIN_CACHE_TOKENS)  # no tensors until used
    return not any(getattr(layer, "is_sliding", False) for layer in probe.layers)


def run_hooks(module: nn.Module, args: tuple, output: tuple) -> None:
    """Run `module`'s forward hooks as if it had just produced `output` (static tensors); a hook's
    replacement outputs are copied into them, so later hooks and the next graph see them."""
    if module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        raise ConfigError("graphed decode cannot replay routers with pre-hooks or keyword hooks")
    current = output
    for hook in list(module._forward_hooks.values()):
        new = hook(module, args, current)
        if new is None:
            continue
        for dst, src in zip(output, new, strict=True):
            if isinstance(dst, torch.Tensor) and src is not dst:
                dst.copy_(src)
        current = output
