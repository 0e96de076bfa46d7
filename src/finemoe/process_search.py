"""Search in a worker process (spec §3.11, "whatever measures best"): the expert-map predictor and
the history recorder run in a separate Python process, so their work never holds the forward
thread's GIL (the searcher *thread* of `async_search` lost to that contention on the H200:
docs/results/policies.md, overhead).

The forward thread sends each routing event as one byte string over a pipe (a fixed header, the
router probabilities of the routed rows [T, E] float32 and their top-k ids [T, k] int64; an
iteration start is pickled: rows and embeddings) and, on its next event, collects the plans the
worker sent back (a non-blocking poll) and posts them to the prefetcher. It never waits for a
search. At most `queue_size` events may be unanswered: beyond that an event is dropped
(counted) and the predictor sits out the rest of its iteration, as the searcher thread does.

The worker owns copies of the history stores (sent once at start); `pull_stores` copies its
rows back (before the engine saves the map store). Speculative gates stay on the forward
thread: they read the model's routers. The worker never touches CUDA; it is a fresh interpreter
(`python -c`, the parent's sys.path), neither a fork (unsafe once CUDA or OpenMP started) nor
multiprocessing's spawn (which re-runs an unguarded `__main__` script). Measured on the H200:
less forward-thread time than inline search, no shorter decode step (docs/results/gpu_trace.md,
fifth campaign), so it is an option (`search=process`), not the default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # the worker imports torch and finemoe, then rebuilds the stores
REPLY_TIMEOUT_S = 60.0


@dataclass
class WorkerSetup:
    """Everything the worker needs to build the predictor chain: picklable, no tensors on a device.

    `deps` is the engine's `PredictorDeps` without stores or gate; the stores travel as their rows."""

    preset: str
    config: Any  # EngineConfig
    deps: Any  # PredictorDeps (maps, requests, gate None)
    all_resident: bool
    maps_geometry: Any  # StoreGeometry
    maps_capacity: int
    maps_distance: int
    maps_emb: np.ndarray  # [C, D]
    maps_rows: np.ndarray  # [C, L, E]
    requests_capacity: int
    requests_eams: np.ndarray  # [R, L, E]


def worker_setup(config: Any, deps: Any, all_resident: bool, maps: Any, requests: Any) -> WorkerSetup:
    """The `WorkerSetup` of an engine: its settings, `deps` without stores or gate, and the rows of
    its history stores `maps` (ExpertMapStore) and `requests` (RequestMatrixStore)."""
    m, r = maps.state(), requests.state()
    return WorkerSetup(
        preset=config.policy,
        config=config,
        deps=dataclasses.replace(deps, maps=None, requests=None, gate=None),
        all_resident=all_resident,
        maps_geometry=maps.geometry,
        maps_capacity=maps.capacity,
        maps_distance=maps.distance,
        maps_emb=m["emb"].numpy(),
        maps_rows=m["maps"].numpy(),
        requests_capacity=requests.capacity,
        requests_eams=r["eams"].numpy(),
    )


# Wire format: every message is one byte string. b"R" + _ROUTE header + probs [T, E] float32 +
# top-k [T, k] int64 (a routing event: the hot path, no pickling); b"P" + a pickled tuple (the rest).
_ROUTE = struct.Struct("<qqBIII")  # iteration, layer, is_prefill, T, E, k
DONE_EVERY = 16  # events answered without a plan: the worker reports its progress every this many


def _pack(msg: tuple) -> bytes:
    return b"P" + pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def _pack_route(event: RoutingEvent, probs: np.ndarray) -> bytes:
    topk = np.ascontiguousarray(event.topk_ids.numpy(), dtype=np.int64)
    T, E = probs.shape
    head = _ROUTE.pack(event.iteration, event.layer, event.is_prefill, T, E, topk.shape[1])
    return b"R" + head + probs.tobytes() + topk.tobytes()


def _unpack(buf: bytes) -> tuple:
    if buf[:1] == b"P":
        return pickle.loads(buf[1:])
    it, layer, prefill, T, E, k = _ROUTE.unpack_from(buf, 1)
    at = 1 + _ROUTE.size
    probs = np.frombuffer(buf, np.float32, T * E, at).reshape(T, E).copy()  # writable, as torch wants
    topk = np.frombuffer(buf, np.int64, T * k, at + 4 * T * E).reshape(T, k).copy()
    return ("route", it, layer, probs, topk, bool(prefill))


def _encode_plan(plan: PrefetchPlan) -> tuple:
    reqs = [(r.expert.layer, r.expert.expert, r.priority) for r in plan.requests]
    hints = [(layer, p.numpy().astype(np.float32).tobytes()) for layer, p in plan.layer_probs]
    return (plan.iteration, plan.replace, reqs, hints)


def _decode_plan(msg: tuple) -> PrefetchPlan:
    iteration, replace, reqs, hints = msg
    return PrefetchPlan(
        tuple(PrefetchRequest(ExpertId(layer, e), p) for layer, e, p in reqs),
        replace=replace,
        iteration=iteration,
        layer_probs=tuple((layer, torch.from_numpy(np.frombuffer(h, np.float32).copy())) for layer, h in hints),
    )


def _handle(chain, msg: tuple) -> PrefetchPlan | None:
    """One forward-pass event for the chain (the worker side of `ProcessPredictor`)."""
    kind = msg[0]
    if kind == "start":
        _, it, prefill, bsz, rows, req, emb, req_ids, fin = msg
        host = None if emb is None else torch.from_numpy(emb)
        ctx = IterationContext(
            it, prefill, bsz, torch.from_numpy(rows), torch.from_numpy(req), host, request_ids=req_ids, finished_ids=fin
        )
        ctx._host = host  # already float32 on the host
        return chain.on_iteration_start(ctx)
    if kind == "route":
        _, it, layer, probs, topk, prefill = msg
        return chain.on_routing(RoutingEvent(it, layer, torch.from_numpy(probs), torch.from_numpy(topk), prefill))
    chain.end_requests()
    return None


def serve(read_fd: int, write_fd: int) -> None:
    """The worker process's entry point (`python -c`, see `ProcessPredictor`): read the
    `WorkerSetup`, rebuild the stores and the chain, then answer messages until "stop" or EOF."""
    rx, tx = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        setup = pickle.loads(rx.recv_bytes())
    except (EOFError, OSError):
        return
    _worker(rx, tx, setup)


def _worker(rx: Connection, tx: Connection, setup: WorkerSetup) -> None:
    torch.set_num_threads(1)
    from finemoe.baselines import RequestMatrixStore
    from finemoe.expert_map import ExpertMapStore
    from finemoe.history import PredictorChain
    from finemoe.presets import get_preset, predictor_members

    maps = ExpertMapStore(setup.maps_geometry, setup.maps_capacity, setup.maps_distance)
    if setup.maps_rows.shape[0]:
        maps.load_rows(torch.from_numpy(setup.maps_emb), torch.from_numpy(setup.maps_rows))
    g = setup.maps_geometry
    requests = RequestMatrixStore(g.num_layers, g.num_experts, setup.requests_capacity)
    if setup.requests_eams.shape[0]:
        requests.load_rows(torch.from_numpy(setup.requests_eams))
    deps = dataclasses.replace(setup.deps, maps=maps, requests=requests, gate=None)
    members = predictor_members(get_preset(setup.preset), setup.config, deps, setup.all_resident)
    chain = members[0] if len(members) == 1 else PredictorChain(members)
    send = tx.send_bytes
    send(_pack(("ready", chain.name)))
    handled, busy = 0, 0.0
    while True:
        try:
            msg = _unpack(rx.recv_bytes())
        except (EOFError, OSError):
            return  # the engine went away
        kind = msg[0]
        if kind == "stop":
            return
        if kind in ("start", "route", "end"):
            t0 = time.perf_counter()
            plan = None
            with torch.inference_mode():
                try:
                    plan = _handle(chain, msg)
                except Exception as e:  # keep serving; prefetching just stops helping
                    log.exception("search process: %s event failed", kind)
                    send(_pack(("error", f"{type(e).__name__}: {e}")))
            handled += 1
            busy += time.perf_counter() - t0
            if plan is not None:
                send(_pack(("plan", handled, _encode_plan(plan))))
            elif handled % DONE_EVERY == 0:
                send(_pack(("done", handled, None)))
        elif kind == "flush":
            send(_pack(("flushed", handled)))
        elif kind == "stats":
            send(_pack(("stats", {**chain.stats(), "search_process_s": busy})))
        elif kind == "stores":
            ms, rs = maps.state(), requests.state()
            send(_pack(("stores", ms["emb"].numpy(), ms["maps"].numpy(), rs["eams"].numpy())))


def _widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """Ask Linux for a 1 MiB pipe buffer (best effort): a large send (a prefill's embeddings) then
    never waits on plans the other side has not read yet."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass


class ProcessPredictor:
    """A predictor whose events are answered by a worker process; the plans it sent back reach
    `sink` (the prefetcher's `post`) on the forward thread's next event (a non-blocking poll: no
    receiver thread to contend for the GIL)."""

    def __init__(self, setup: WorkerSetup, sink, queue_size: int = 64) -> None:
        self.sink, self.queue_size = sink, queue_size
        self.name = "finemoe-process"
        self.posted = self.handled = 0
        self.dropped = 0
        self.error: BaseException | str | None = None
        self._skip_iteration = -1  # an event of this iteration was dropped: sit the rest out
        # A fresh interpreter (not multiprocessing's spawn, which re-runs an unguarded __main__
        # script, nor fork, unsafe after CUDA/OpenMP started): two pipes, the parent's sys.path.
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = f"from finemoe.process_search import serve; serve({from_parent}, {to_parent})"
        try:  # its own session: a Ctrl-C in the terminal stops the engine, which then stops it
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(from_parent, to_parent),
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except OSError:
            for fd in (from_parent, to_child, from_child, to_parent):
                os.close(fd)
            raise
        finally:
            if hasattr(self, "_proc"):
                os.close(from_parent)
                os.close(to_parent)
        self._closed = False
        self._tx = Connection(to_child, readable=False)
        self._conn = Connection(from_child, writable=False)
        self._poller = select.poll()
        self._poller.register(from_child, select.POLLIN)
        for fd in (to_child, from_child):
            _widen_pipe(fd)
        self._send_setup(setup)
        reply = self._reply("ready", START_TIMEOUT_S)
        if reply is not None:
            self.name = reply[1]

    # -- plumbing ------------------------------------------------------------------------------
    def _send_setup(self, setup: WorkerSetup) -> None:
        try:
            self._tx.send_bytes(pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            self._fail(e)

    def _fail(self, e: BaseException | str) -> None:
        if self.error is None:
            log.error("search process failed; prefetch plans stop (%s)", e)
        self.error = e

    def _dispatch(self, msg: tuple) -> tuple | None:
        """Apply a worker message: plans to the sink, progress counts; other replies returned."""
        kind = msg[0]
        if kind == "plan":
            self.handled = msg[1]
            self.sink(_decode_plan(msg[2]))
        elif kind == "done":
            self.handled = msg[1]
        elif kind == "error":
            self._fail(msg[1])
        else:
            return msg
        return None

    def _collect(self) -> None:
        """Everything the worker has sent so far (never blocks)."""
        if self.error is not None:
            return
        conn, ready = self._conn, self._poller.poll
        try:
            while ready(0):  # a poll object made once: Connection.poll builds a selector per call
                self._dispatch(_unpack(conn.recv_bytes()))
        except (EOFError, OSError) as e:
            self._fail(e)

    def _reply(self, kind: str, timeout: float = REPLY_TIMEOUT_S) -> tuple | None:
        """Wait for the worker's next `kind` reply, applying the plans sent before it (None if the
        worker died or did not answer within `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        conn = self._conn
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"search process gave no {kind!r} reply in {timeout:.0f} s")
                if conn.poll(min(left, 1.0)):
                    msg = self._dispatch(_unpack(conn.recv_bytes()))
                    if msg is not None:
                        if msg[0] != kind:
                            raise RuntimeError(f"search process: expected {kind!r}, got {msg[0]!r}")
                        return msg
                elif self._proc.poll() is not None:
                    raise EOFError(f"search process exited with status {self._proc.returncode}")
        except (EOFError, OSError, TimeoutError, RuntimeError) as e:
            self._fail(e)
            return None

    def _send(self, msg: tuple | bytes, counted: bool = True) -> bool:
        if self.error is not None:
            return False
        try:
            self._tx.send_bytes(msg if isinstance(msg, bytes) else _pack(msg))
        except (OSError, ValueError) as e:
            self._fail(e)
            return False
        if counted:
            self.posted += 1
        return True

    def _room(self, iteration: int) -> bool:
        self._collect()
        if iteration == self._skip_iteration:
            return False
        if self.posted - self.handled >= self.queue_size:
            self.dropped += 1
            self._skip_iteration = iteration
            return False
        return True

    # -- the predictor interface ---------------------------------------------------------------
    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        if self._room(ctx.iteration):
            emb = ctx.host_embeddings()
            self._send(
                (
                    "start",
                    ctx.iteration,
                    ctx.is_prefill,
                    ctx.batch_size,
                    ctx.rows.numpy(),
                    ctx.request_of_row.numpy(),
                    None if emb is None else emb.numpy(),
                    ctx.request_ids,
                    ctx.finished_ids,
                )
            )
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        if self._room(event.iteration):
            probs = np.ascontiguousarray(event.host_probs().numpy())  # [T, E] float32
            self._send(_pack_route(event, probs))
        return None

    def end_requests(self) -> None:
        self._collect()
        self._send(("end",))
        self._skip_iteration = -1

    def flush(self) -> None:
        """Wait until the worker has answered every event sent so far; post its plans."""
        if self._send(("flush",), counted=False):
            reply = self._reply("flushed")
            if reply is not None:
                self.handled = reply[1]

    def pull_stores(self, maps, requests) -> bool:
        """Copy the worker's history stores (it learns online) into `maps` and `requests`; False
        (stores untouched) if the worker could not answer."""
        if not self._send(("stores",), counted=False):
            return False
        reply = self._reply("stores")
        if reply is None:
            return False
        _, emb, rows, eams = reply
        maps.load_rows(torch.from_numpy(emb), torch.from_numpy(rows))
        requests.load_rows(torch.from_numpy(eams))
        return True

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"contexts_dropped": self.dropped}
        if self._send(("stats",), counted=False):
            reply = self._reply("stats")
            if reply is not None:
                out = {**reply[1], **out}
        if self.error is not None:
            out["search_error"] = repr(self.error)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send(("stop",), counted=False)
        self.error = self.error or "closed"  # nothing is sent after this (and no failure is logged)
        self._tx.close()  # EOF: the worker stops even if "stop" could not be sent
        self._conn.close()  # and a worker blocked writing to us fails at once
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
