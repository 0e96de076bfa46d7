"""The predictors' device work in a graphed decode step: one small CUDA graph per MoE layer beside
the segments (`graphs.StaticDecoder`).

Layer l's side graph holds `search="device"`'s map match of layer l (`device_plans.DeviceMatches`)
and `graph_gates`' speculative gates on layer l's router input (their probabilities copied into
pinned host rows). It is replayed on a stream of its own once segment l+1 is launched (or, with
`first`, once the host has synced on layer l's ids, before the serve): the segments stay the same
graphs lru replays, and the host pays the side launch while the GPU runs segment l+1. Router l's
static outputs and inputs are complete by then (the host synced on its ids); the host waits on the
side graph's event only before it reads a result (`settle`, `settle_match`).

With the fused match (one Triton kernel that *catches up* every layer not yet in the running sums,
`fused_match`), a layer's match may be deferred: a layer run ahead whose match no plan of the step
will read (`match_needed`) replays its gates alone (or nothing), and the next match launched, or
one launched when a match is read (`settle_match`), computes the skipped layers too. A step whose
layers all run ahead but the last few then launches one match instead of one per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

import torch
from torch import nn

from finemoe.models.base import softmax_probs

if TYPE_CHECKING:
    import numpy as np

    from finemoe.device_plans import DeviceMatches
    from finemoe.runtime import OffloadRuntime

NOT_LAUNCHED, LAUNCHED, SETTLED = 0, 1, 2  # a layer's side graph in the current step


class SideGraphs:
    """The side graphs of one engine's graphed decode steps, their stream, pool and pinned rows."""

    def __init__(self, runtime: OffloadRuntime, layers: int, device: torch.device) -> None:
        self.rt, self.layers, self.device = runtime, layers, device
        self.stream = torch.cuda.Stream(device)
        self.gates_skipped = 0  # side launches without their gates (`launch(gates=False)`), in total
        self.matches_deferred = 0  # side launches without their match (`launch(match=False)`), in total
        self.late_matches = 0  # matches launched by a read (`settle_match`), in total
        # per MoE layer: its side graph per (match, gates) it replays, each variant captured where it
        # has both ({(True, True), (True, False), (False, True)}) or its one kind alone
        self.variants: list[dict[tuple[bool, bool], torch.cuda.CUDAGraph]] = []
        self.done: list[torch.cuda.Event | None] = []
        self._pool = None
        self._state: list[int] = []  # per layer in the current step (NOT_LAUNCHED, LAUNCHED, SETTLED)
        # per layer in the current step: the event after which its match is in the host rows (None:
        # not launched yet); the last layer whose match is launched
        self._cover: list[torch.cuda.Event | None] = []
        self._through = -1
        # the current step's side start (`begin_step`, `_open`): whether it is still to run, the work
        # it adds, and the point of the compute stream it follows (recorded at `begin_step`)
        self._unopened = False
        self._opening: Callable[[], None] | None = None
        self._begun = torch.cuda.Event()
        # the current step's compute stream (`begin_step`): the current stream again after each side
        # launch, which switches streams with `torch.cuda.set_stream`, not a stream context (whose
        # lookup of the current stream costs the host ~10 µs a launch)
        self._compute: torch.cuda.Stream | None = None
        # the event recorded on the side stream after the current step's latest side graph (`_replay`):
        # after every side work of the step, what the next step's `before_step` waits for
        self._last_done: torch.cuda.Event | None = None
        # a measurement switch (`predictor_overhead.py`'s `no-side-wait`): False, the next step does not
        # wait for the last one's side graphs, which may then read tensors it rewrites (wrong plans,
        # never wrong tokens: every routed expert is made resident as read)
        self.wait_last = True
        self._count = 0  # side graphs per step (set at capture)
        self._kinds: list[tuple[bool, bool]] = []  # per layer: (a variant has the match, one has the gates)
        self.fused = False  # the match is the fused catch-up (set at capture): it may be deferred
        self._pending = False  # sides launched in a step the next one must not overlap
        self.step = 0  # replayed steps with sides, naming the step a `settle` call belongs to
        # Launch layer l's side graph right after the host synced on its ids, before the serve: the
        # GPU, idle until segment l+1's launch, starts it there instead of beside segment l+1's
        # kernels (whose spans it lengthens, `benchmarks/decode_gpu_timeline.py`), at the cost of
        # the side launch on the host before the segment's (an experiment's knob; off by default).
        self.first = False
        # per MoE layer: the speculative gates' probabilities its side graph computes and copies to
        # pinned host memory ({target: [T, E] float32}, static), whether they cover every gate
        # stride, and NumPy views of those rows ({target: [T, E]}: the host reads them without a
        # torch call, ~5-10 µs each on the H200 machine's host) (`OffloadRuntime.speculated`)
        self.speculated: list[tuple[dict[int, torch.Tensor], bool, dict[int, np.ndarray]]] = []
        self._gate_host: dict[tuple[int, int], torch.Tensor] = {}  # (layer, target) -> pinned [1, E] float32
        self.linear: list = []  # per MoE layer: its router's (weight, bias) when a plain linear map, else None

    def count(self) -> int:
        """Side graphs per step."""
        return self._count

    def gate_rows(self) -> int:
        """Gate probability rows per step."""
        return sum(len(done) for done, *_ in self.speculated)

    # -- capture ---------------------------------------------------------------------------------
    def prepare(self, speculate: bool) -> None:
        """Before the segments' capture (the device idle): the gates' linear maps checked and their
        pinned rows made (older rows freed), when the step computes gates."""
        rt = self.rt
        gate = rt.router_gate
        self.linear = [gate.device_linear(t) for t in range(self.layers)] if speculate and gate is not None else []
        self._gate_host = self._gate_buffers() if self.linear else {}

    def capture(self, routed: list[tuple[nn.Module, tuple, tuple]], capturing: torch.cuda.Stream) -> None:
        """Capture the side graphs of every MoE layer whose match a plan reads or whose router input
        feeds a gate, after the segments (`routed`: per layer the router, its static inputs and
        outputs), into a pool of their own. Captured on the stream they replay on, not on the
        segments' capture stream `capturing`: torch gives each stream its own cuBLAS workspace and
        a graph keeps the one it was captured with, so a side graph and the segment beside it must
        not share one."""
        matches = self.rt.device_matches
        self._pool = torch.cuda.graph_pool_handle()
        self.done, self.variants = [], []
        self.speculated = [({}, False, {})] * self.layers
        self.stream.wait_stream(capturing)
        with torch.cuda.stream(self.stream):
            self.fused = self._warm_fused(routed, matches)
            for layer in range(self.layers):
                self._capture_layer(layer, routed[layer], matches)
        capturing.wait_stream(self.stream)
        self.index_variants()

    def index_variants(self) -> None:
        """Summarise `variants` for the launches (after the capture): the side graphs per step and,
        per layer, whether some variant has the match / the gates (two scans a launch otherwise)."""
        self._count = sum(bool(v) for v in self.variants)
        self._kinds = [(any(m for m, _ in v), any(g for _, g in v)) for v in self.variants]

    def _warm_fused(self, routed: list[tuple[nn.Module, tuple, tuple]], matches: DeviceMatches | None) -> bool:
        """Whether the side graphs' match is the fused catch-up (`DeviceMatches.fused`, a softmax
        family, contiguous logits); if so, bind the matched layers' static logits to it and run it
        once before the capture: Triton compiles on the first launch, and loading a kernel while a
        stream captures fails. Each step restarts the sums (`begin_step`), so what this leaves
        behind is overwritten."""
        if matches is None or not matches.fused or self.rt.adapter.router_probs is not softmax_probs:
            return False
        at = self.rt.adapter.router_logits_at
        logits = [routed[layer][2][at].detach() if matches.wants(layer) else None for layer in range(self.layers)]
        wanted = [t for t in logits if t is not None]
        if not wanted or not all(t.is_contiguous() and t.numel() == t.shape[-1] for t in wanted):
            return False
        planner = matches.planner
        planner.bind_logits(logits)
        planner.restart()
        planner.catch_up(max(layer for layer, t in enumerate(logits) if t is not None))
        return True

    def _capture_layer(self, layer: int, routed: tuple[nn.Module, tuple, tuple], matches: DeviceMatches | None) -> None:
        module, args, output = routed
        match = matches is not None and matches.wants(layer)
        targets, covers = self._gate_targets(layer, args) if self.linear else ([], False)
        self.speculated[layer] = ({}, covers, {})
        if not (match or targets):
            self.variants.append({})  # (nothing to do there)
            self.done.append(None)
            return
        kinds = [(match, bool(targets))]
        if match and targets:  # each alone too: the same kernels on the same buffers
            kinds += [(True, False), (False, True)]
        variants = {}
        for with_match, with_gates in kinds:
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                with torch.no_grad():
                    if with_match:
                        self._record_match(layer, module, output, matches)  # type: ignore[arg-type]
                    if with_gates:
                        rows = self._speculate(layer, args, targets)
                        self.speculated[layer] = (rows, covers, {t: r.numpy() for t, r in rows.items()})
            except BaseException:
                with suppress(Exception):  # (report the first error)
                    graph.capture_end()
                raise
            graph.capture_end()
            variants[with_match, with_gates] = graph
        self.variants.append(variants)
        self.done.append(torch.cuda.Event())

    def _record_match(self, layer: int, module: nn.Module, output: tuple, matches: DeviceMatches) -> None:
        """Layer `layer`'s match into the graph being captured: the fused catch-up through it, or the
        torch ops of its step on its router's probabilities."""
        if self.fused:
            matches.capture_catch_up(layer)
            return
        logits = output[self.rt.adapter.router_logits_at].detach()
        matches.capture_layer(layer, self.rt.adapter.router_probs(module, logits.reshape(-1, logits.shape[-1])))

    def _gate_buffers(self) -> dict[tuple[int, int], torch.Tensor]:
        """Pinned host rows [1, E] float32 per (layer, speculative target), made before the capture
        (no pinned allocation while capturing); the graphs copy the gates' probabilities into them.
        One row per pair: with several strides, two layers' gates may target the same layer."""
        E = self.rt.spec.num_experts
        out = {}
        with torch.inference_mode(False):  # written by replays, read by later requests
            for layer in range(self.layers):
                for stride in self.rt.gate_strides:
                    target = layer + stride
                    if target < self.layers and self.linear[target] is not None:
                        out[layer, target] = torch.zeros((1, E), dtype=torch.float32, pin_memory=True)
        return out

    def _gate_targets(self, layer: int, args: tuple) -> tuple[list[int], bool]:
        """The gate targets of layer `layer` computed on the device, and whether they are all of
        its strides' targets within the model. A target whose router is not a plain linear map, or
        whose weight's dtype differs from the router input's, is left to the host gate (and the
        router input is still copied)."""
        hidden = args[0] if args else None
        targets, covers = [], True
        for stride in self.rt.gate_strides:
            target = layer + stride
            if target >= self.layers:
                continue
            lin = self.linear[target]
            rows = None if hidden is None else hidden.reshape(-1, hidden.shape[-1]).shape[0]
            if lin is None or hidden is None or hidden.dtype != lin[0].dtype or rows != 1:
                covers = False
                continue
            targets.append(target)
        return targets, covers

    def _speculate(self, layer: int, args: tuple, targets: list[int]) -> dict[int, torch.Tensor]:
        """Record into layer `layer`'s side graph the speculative gates' probabilities on its router
        input `args[0]`: per target the target router's linear map and routing function, and a copy
        into its pinned host row. The host reads the rows after `settle(layer)` instead of copying
        the router input, and runs no router itself."""
        done: dict[int, torch.Tensor] = {}
        hidden = args[0].reshape(-1, args[0].shape[-1])  # [1, H]
        for target in targets:
            host = self._gate_host[layer, target]
            logits = torch.nn.functional.linear(hidden, *self.linear[target])  # [1, E]
            probs = self.rt.adapter.router_probs(self.rt.router_gate.routers[target], logits).float()
            host.copy_(probs, non_blocking=True)  # [1, E] into pinned memory, inside the graph
            done[target] = host
        return done

    # -- replay ----------------------------------------------------------------------------------
    def begin_step(self, compute: torch.cuda.Stream, opening: Callable[[], None] | None = None) -> None:
        """A replayed step with sides starts on `compute`; the step's layers are not launched yet.
        The host work of its start waits for its first side graph (`_open`): there the side stream
        follows what `compute` had queued at this call (an event recorded now, not the segments
        launched since), `opening` runs on it (the map store's new rows copied), and the fused
        match's sums restart. A step that launches no side graph does none of it (the store's rows
        are then copied by a later step's)."""
        self._begun.record(compute)  # (what `compute` has queued now: the side work follows it, not later segments)
        self._compute = compute
        self._opening, self._unopened = opening, True
        self._state = [NOT_LAUNCHED] * self.layers
        self._cover = [None] * self.layers
        self._through = -1
        self._pending = True
        self.step += 1

    def before_step(self, compute: torch.cuda.Stream) -> None:
        """Any replayed step: the last step's sides read static tensors this one rewrites (none if it
        launched none: its side start never ran, `_open`)."""
        if self._pending and not self._unopened and self._last_done is not None and self.wait_last:
            compute.wait_event(self._last_done)  # (recorded already: no host record on the step's start)
        self._pending = False

    @property
    def opened(self) -> bool:
        """Whether the current step's side work has started (a side graph was launched); meaningful
        only between a step's `begin_step` and its end."""
        return not self._unopened

    def due(self, layer: int) -> bool:
        """Whether layer `layer` has a side graph not yet launched in the current step."""
        return bool(self.variants[layer]) and self._state[layer] == NOT_LAUNCHED

    def gates_needed(self, layer: int, slot_of: list[list[int]]) -> bool:
        """Whether layer `layer`'s gate rows may be read in this step, as it is run ahead: False when
        every layer from `layer` + 1 through its last gate target has all its experts resident
        (`slot_of` [L][E], -1: absent). The host launches those without a routing sync and evicts
        nothing before the next routing it reads, whose event then names them launched: the gates
        make no plan for them (`RoutingEvent.launched`) and their rows are never read."""
        targets = self.speculated[layer][0] if layer < len(self.speculated) else {}
        if not targets:
            return False
        # (-1 in a row, not min: a C scan that stops at the first absent expert; per layer of the launch phase)
        return any(-1 in row for row in slot_of[layer + 1 : max(targets) + 1])

    def match_needed(self, layer: int, slot_of: list[list[int]]) -> bool:
        """Whether layer `layer`'s match may be read in this step, when routings read after running
        ahead name the layers launched: False when every layer from `layer` + 1 through `layer` + 1
        + the prefetch distance has all its experts resident (`slot_of` [L][E], -1: absent). Its
        reader, layer `layer` + 1's routing, is then run ahead and read at the next routing sync or
        the step's end, with its plan's target launched already (no plan, no read). A match that is
        read after all (an eviction made a layer absent in between) is launched then
        (`settle_match`): slower, as right. True where matches cannot be deferred."""
        matches = self.rt.device_matches
        if not self.fused or matches is None or matches.reads_every_layer:
            return True
        return any(-1 in row for row in slot_of[layer + 1 : min(layer + 2 + matches.distance, self.layers)])

    def launch(self, layer: int, after: torch.cuda.Event | None = None, gates: bool = True, match: bool = True) -> None:
        """Replay layer `layer`'s side graph on the side stream and mark its end with its event.
        Router `layer`'s outputs must be complete: the host synced on its ids, or `after` marks them
        on the compute stream (a layer run ahead, `runahead`), which the side stream then waits for.
        `gates` False: without the gates (the caller knows their rows will not be read,
        `gates_needed`); `match` False: the match deferred where it can be (`match_needed`)."""
        variants = self.variants[layer]
        has_match, has_gates = self._kinds[layer]
        # (the fused catch-up covers layers up to `_through` already; the torch ops never defer)
        run_match = has_match and (not self.fused or (match and layer > self._through))
        run_gates = has_gates and gates
        self.gates_skipped += has_gates and not gates
        self.matches_deferred += has_match and not run_match
        self._state[layer] = LAUNCHED
        if not (run_match or run_gates):  # nothing to run or wait for now
            self._state[layer] = SETTLED
            return
        self._replay(layer, variants[run_match, run_gates], after, run_match)

    def _open(self) -> None:
        """The step's side work starts (`begin_step`): on the side stream, after `_begun`."""
        opening, self._opening, self._unopened = self._opening, None, False
        self.stream.wait_event(self._begun)
        torch.cuda.set_stream(self.stream)
        try:
            if opening is not None:
                opening()
            if self.fused:
                self.rt.device_matches.planner.restart()  # type: ignore[union-attr]
        finally:
            torch.cuda.set_stream(self._compute)

    def _replay(self, layer: int, graph: torch.cuda.CUDAGraph, after: torch.cuda.Event | None, matched: bool) -> None:
        # (on the forward thread, whose current stream is the step's compute stream: the current
        # stream is per thread, and a side launch leaves `_compute` current)
        assert self._compute is not None, "begin_step() first"
        if self._unopened:
            self._open()
        if after is not None:
            self.stream.wait_event(after)
        torch.cuda.set_stream(self.stream)  # (the current stream is the step's compute stream)
        try:
            graph.replay()
        finally:
            torch.cuda.set_stream(self._compute)
        done = self.done[layer]
        assert done is not None
        done.record(self.stream)
        self._last_done = done
        if matched:  # the fused catch-up covers every layer after the last one matched
            for k in range(self._through + 1 if self.fused else layer, layer + 1):
                self._cover[k] = done
            self._through = max(self._through, layer)

    def settle(self, layer: int, step: int) -> None:
        """Make layer `layer`'s gate rows of replayed step `step` readable on the host: its side
        graph launched if it was not yet (a listener built the event in the router hook), and
        waited for. A layer without a side graph has nothing to wait for. Raises if a later step
        has replayed since (the rows and matches are rewritten every step)."""
        self._check(step)
        state = self._state[layer] if layer < len(self._state) else SETTLED
        if state == SETTLED or not self.variants[layer]:
            return
        if state == NOT_LAUNCHED:
            self.launch(layer)
        self.done[layer].synchronize()  # type: ignore[union-attr]
        self._state[layer] = SETTLED

    def settle_match(self, layer: int, step: int) -> None:
        """Make layer `layer`'s map match of replayed step `step` readable on the host: launched now
        if it was deferred (with the gates if its side graph was not launched at all), and waited
        for."""
        self._check(step)
        if self._cover[layer] is None:
            if self._state[layer] == NOT_LAUNCHED:
                self.launch(layer)
            else:
                self.late_matches += 1
                self._replay(layer, self.variants[layer][True, False], None, True)
        cover = self._cover[layer]
        if cover is None:
            raise RuntimeError(f"layer {layer}'s map match was read but has no side graph to compute it")
        cover.synchronize()

    def _check(self, step: int) -> None:
        if step != self.step:
            raise RuntimeError(
                f"a graphed decode step's gate rows or map match were read after the step (step {step}, now "
                f"{self.step}): read them while the step runs (e.g. in the predictor's on_routing)"
            )

    def finish(self) -> None:
        """Wait for the side graphs still running (the end of a generation, or their graphs dropped)."""
        if self._pending:
            self.stream.synchronize()
            self._pending = False

    def drop(self) -> None:
        """Wait for them, then free the graphs and the gates' state."""
        self.finish()
        self.done, self._pool, self.speculated, self.variants = [], None, [], []
        self._count, self._kinds = 0, []
        self._last_done = None
