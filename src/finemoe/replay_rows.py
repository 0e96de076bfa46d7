"""A trace's replay inputs: per iteration its context, routing rows and router stand-in, made
once per batch of consecutive requests (`BatchRows`) or per iteration (`iteration_tensors`), and
each (iteration, layer)'s sorted unique experts (`accesses_of`). The simulator feeds them to the
engine's own objects; a single-row iteration (a decode step at batch 1) makes no tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finemoe.trace import Trace
from finemoe.types import IterationContext, RoutingEvent


def iteration_tensors(
    trace: Trace, g: int, prefill: bool, parts: list[tuple[int, int, int]]
) -> tuple[IterationContext, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context, probs [L, N, E] float32, top-k [L, N, k] and the router stand-in [N, 2] of an iteration
    made of rows [a, b) of each (request, a, b) in `parts` (batch order)."""
    if len(parts) == 1:
        _, a, b = parts[0]
        ids = torch.arange(a, b)
        probs, topk, emb = trace.probs[a:b].float(), trace.topk[a:b], trace.embeddings(a, b)
        req = torch.zeros(b - a, dtype=torch.int64)
    else:
        ids = torch.cat([torch.arange(a, b) for _, a, b in parts])
        probs, topk = trace.probs[ids].float(), trace.topk[ids]
        emb = torch.cat([trace.embeddings(a, b) for _, a, b in parts])
        req = torch.cat([torch.full((b - a,), i, dtype=torch.int64) for i, (_, a, b) in enumerate(parts)])
    n = ids.numel()
    ctx = IterationContext(g, prefill, len(parts), torch.arange(n), req, emb, emb)  # float32 CPU: its own host copy
    # per layer contiguous, as the engine's router outputs are: [L, N, E] and [L, N, k]; the
    # stand-in router input: [N, 2] (trace row, layer), the layer column set per event
    stand_in = torch.stack([ids.float(), torch.zeros(n)], dim=1)
    return ctx, probs.transpose(0, 1).contiguous(), topk.transpose(0, 1).contiguous(), stand_in


class TensorOnRead:
    """A field that may hold a NumPy array until read: read, it becomes a tensor of the same memory
    (`torch.from_numpy`), kept in the instance's `__dict__` under the field's name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        v = obj.__dict__[self.name]
        if isinstance(v, np.ndarray):
            v = obj.__dict__[self.name] = torch.from_numpy(v)
        return v

    def __set__(self, obj: Any, value: torch.Tensor | np.ndarray) -> None:
        obj.__dict__[self.name] = value


class ReplayEvent(RoutingEvent):
    """A replayed routing whose `probs` and `topk_ids` may arrive as NumPy rows, made tensors only
    if a consumer reads them: a layer whose consumers read only the event's host views
    (`host_probs_np`, `topk_lists`) makes no tensor. The same values either way."""

    probs = TensorOnRead()  # type: ignore[assignment]
    topk_ids = TensorOnRead()  # type: ignore[assignment]

    @classmethod
    def of(
        cls, iteration: int, layer: int, probs: np.ndarray, topk: np.ndarray, prefill: bool, hidden: Any, lists: list
    ) -> ReplayEvent:
        """`cls(iteration, layer, probs, topk, prefill, hidden, _host_np=probs, _topk_list=lists)`,
        its fields written at once (the dataclass `__init__` calls the descriptors: 0.8 against
        0.45 µs, once per layer-step). Every field of `RoutingEvent` is set (a test checks)."""
        ev = object.__new__(cls)
        ev.__dict__ = {
            "iteration": iteration,
            "layer": layer,
            "probs": probs,
            "topk_ids": topk,
            "is_prefill": prefill,
            "hidden": hidden,
            "to_probs": None,
            "_host": None,
            "speculated": None,
            "speculated_probs": None,
            "_host_np": probs,
            "_topk_list": lists,
            "launched": -1,
        }
        return ev


class BatchRows:
    """`iteration_tensors` for the iterations of one batch of consecutive requests, its rows'
    tensors laid out once: probs [L, n, E] float32 and top-k [L, n, k] per layer contiguous, the
    embeddings [n, D], where n is the batch's rows (the same values, fewer tensor ops per iteration).
    A single-row iteration (a decode step at batch 1) makes no tensor at all: its per-layer views,
    top-k lists and context tensors are made for all such rows at once here (a torch call costs
    ~10x more amid the replay's Python than in a tight loop: cold caches)."""

    def __init__(self, trace: Trace, batch: list[int]) -> None:
        self.trace = trace
        a, b = int(trace.row_start[batch[0]]), int(trace.row_start[batch[-1] + 1])
        self.base = a
        self.probs = trace.probs[a:b].float().transpose(0, 1).contiguous()  # [L, n, E]
        self.topk = trace.topk[a:b].transpose(0, 1).contiguous()  # [L, n, k]
        self.emb = trace.embeddings(a, b)  # [n, D]
        self.probs_np, self.topk_np = self.probs.numpy(), self.topk.numpy()  # the same memory
        self._one: dict[int, tuple] = {}  # batch row of a single-row iteration -> its inputs
        self._rows1, self._req1 = torch.arange(1), torch.zeros(1, dtype=torch.int64)  # [1] each, shared
        self._rows1_list = [0]  # `_rows1` as ints (shared, never changed)
        self._stand_in1 = torch.zeros(1, 2)  # [1, 2], rewritten per single-row iteration
        self._stand_in1_np = self._stand_in1.numpy()
        for r in batch:  # each request's decode rows: one row per iteration
            start, plen, n = int(trace.row_start[r]), int(trace.prompt_len[r]), int(trace.output_len[r])
            lo, hi = start + plen - a, start + plen + max(n - 1, 0) - a
            if hi <= lo:
                continue
            lists = self.topk[:, lo:hi, None].transpose(0, 1).tolist()  # [m][L][1][k]: each row's per-layer lists
            emb = self.emb[lo:hi].split(1)  # [m] of [1, D]
            for i in range(hi - lo):
                row = lo + i  # its layers as NumPy rows [L, 1, E], [L, 1, k]: `ReplayEvent` makes tensors if read
                rows_np, topk_np = self.probs_np[:, row : row + 1], self.topk_np[:, row : row + 1]
                self._one[row] = (rows_np, topk_np, emb[i], rows_np, lists[i])

    def iteration(
        self, g: int, prefill: bool, parts: list[tuple[int, int, int]]
    ) -> tuple[IterationContext, tuple, tuple, torch.Tensor, np.ndarray, list | None]:
        """Context, per-layer probs ([N, E] each), per-layer top-k ([N, k] each) and the router
        stand-in [N, 2], as `iteration_tensors` gives them (unbound by layer), the probs as one
        NumPy array [L, N, E] (the same memory) and, where made already, the top-k as lists
        [L][N][k]."""
        if len(parts) != 1:
            ctx, probs, topk, ids = iteration_tensors(self.trace, g, prefill, parts)
            return ctx, probs.unbind(0), topk.unbind(0), ids, probs.numpy(), None
        _, a, b = parts[0]
        n, i, j = b - a, a - self.base, b - self.base
        one = self._one.get(i) if n == 1 else None
        if one is not None:
            probs, topk, emb, probs_np, lists = one
            ctx = IterationContext(g, prefill, 1, self._rows1, self._req1, emb, emb, _rows_list=self._rows1_list)
            self._stand_in1_np[0, 0] = a  # (trace row, layer): the layer goes to the gate as a number
            return ctx, probs, topk, self._stand_in1, probs_np, lists
        emb = self.emb[i:j]
        ctx = IterationContext(g, prefill, 1, torch.arange(n), torch.zeros(n, dtype=torch.int64), emb, emb)
        stand_in = torch.stack([torch.arange(a, b).float(), torch.zeros(n)], dim=1)  # [N, 2]
        return ctx, self.probs[:, i:j].unbind(0), self.topk[:, i:j].unbind(0), stand_in, self.probs_np[:, i:j], None


# -- batches and accesses ------------------------------------------------------------------------
def schedule(trace: Trace, batch_size: int) -> list[list[int]]:
    """Consecutive requests in batches of `batch_size`."""
    R = trace.num_requests
    return [list(range(i, min(i + batch_size, R))) for i in range(0, R, batch_size)]


def accesses_of(trace: Trace, batches: list[list[int]]) -> list[list[list[int]]]:
    """The sorted unique experts of every (iteration, layer) of the replay of `batches`. A decode
    row alone in its iteration: its top-k ids sorted in NumPy, all of a request's rows at once
    (a token's top-k ids are distinct: checked, else the general path)."""
    out: list[list[list[int]]] = []
    L = trace.spec.num_layers
    topk = trace.topk.numpy()  # [rows, L, k] (the same memory)
    for batch in batches:
        ranges = [trace.row_ranges(r) for r in batch]
        one: dict[int, list[list[int]]] = {}  # decode row -> its layers' sorted ids [L][k]
        if len(batch) == 1 and len(ranges[0]) > 1:
            lo, hi = ranges[0][1][0], ranges[0][-1][1]  # the request's decode rows [lo, hi)
            s = np.sort(topk[lo:hi], axis=2)  # [m, L, k]
            if not bool((s[..., 1:] == s[..., :-1]).any()):
                one = dict(zip(range(lo, hi), s.tolist(), strict=True))
        for it in range(max(len(x) for x in ranges)):
            live = [x[it] for x in ranges if it < len(x)]
            if len(live) == 1 and live[0][0] in one:
                out.append(one[live[0][0]])
                continue
            ids = np.concatenate([topk[a:b] for a, b in live]) if len(live) > 1 else topk[live[0][0] : live[0][1]]
            per_layer = ids.transpose(1, 0, 2).reshape(L, -1).tolist()  # [L, N*k]
            out.append([sorted(set(x)) for x in per_layer])
    return out
