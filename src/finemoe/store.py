"""The host tier: every routed expert as one contiguous slab in (pinned) host memory.

Memory is allocated one chunk per MoE layer ([E, expert_numel]) and each expert's slab is a row
of it, so one expert is one H2D copy. On CUDA machines the chunks are page-locked in place with
cudaHostRegister (no rounding to powers of two as the caching host allocator does).
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

import torch
from tqdm.auto import tqdm

from finemoe.types import ExpertId, MoESpec

log = logging.getLogger(__name__)


class ExpertSource(Protocol):
    def read_into(self, eid: ExpertId, parts: list[torch.Tensor]) -> None: ...


def part_views(slab: torch.Tensor, spec: MoESpec) -> list[torch.Tensor]:
    """Views of a flat expert slab shaped like `spec.parts`."""
    views, offset = [], 0
    lead = tuple(slab.shape[:-1])
    for part in spec.parts:
        views.append(slab[..., offset : offset + part.numel].view(*lead, *part.shape))
        offset += part.numel
    return views


class ExpertStore:
    """All L*E experts in host memory. `slab(eid)` is a contiguous 1-D tensor of `expert_numel`."""

    def __init__(self, spec: MoESpec, pin: bool) -> None:
        self.spec = spec
        self.chunks = [torch.empty(spec.num_experts, spec.expert_numel, dtype=spec.dtype) for _ in spec.moe_layers]
        self.pinned = False
        self._views: dict[ExpertId, list[torch.Tensor]] = {}
        if pin:
            self._pin()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def slab(self, eid: ExpertId) -> torch.Tensor:
        return self.chunks[eid.layer][eid.expert]

    def parts(self, eid: ExpertId) -> list[torch.Tensor]:
        """The expert's parts as contiguous views of its slab, shaped like `spec.parts` (made once
        per expert: every copy into a slot asks for them)."""
        views = self._views.get(eid)
        if views is None:
            views = self._views[eid] = part_views(self.slab(eid), self.spec)
        return views

    @torch.no_grad()
    def fill(self, source: ExpertSource, progress: bool = True, desc: str = "loading experts") -> None:
        """Read every expert from `source` into its slab, one expert at a time."""
        spec = self.spec
        total = spec.num_total_experts
        with tqdm(total=total, desc=desc, unit="expert", disable=not progress, leave=False) as bar:
            for layer in range(spec.num_layers):
                for e in range(spec.num_experts):
                    eid = ExpertId(layer, e)
                    source.read_into(eid, part_views(self.slab(eid), spec))
                    bar.update(1)
        log.info("expert store: %d experts, %.2f GiB, pinned=%s", total, self.nbytes / 2**30, self.pinned)

    def _pin(self) -> None:
        if not torch.cuda.is_available():
            return
        flush_deferred()  # (the chunks a collection during a graph capture left)
        cudart = torch.cuda.cudart()
        done: list[torch.Tensor] = []
        for c in self.chunks:
            err = int(cudart.cudaHostRegister(c.data_ptr(), c.nbytes, 0))
            if err != 0:
                _unregister(done)
                raise RuntimeError(
                    f"cudaHostRegister failed with CUDA error {err} while pinning {c.nbytes} bytes of the expert "
                    f"store; is host memory (or the locked-memory limit, `ulimit -l`) too small?"
                )
            done.append(c)
        self.pinned = True
        # Unregister before the memory is freed, however the store goes away (the finalizer holds the chunks).
        self._finalizer = weakref.finalize(self, _unregister, list(self.chunks))

    def close(self) -> None:
        self._views.clear()  # the cached views would keep the chunks alive
        if self.pinned:
            self._finalizer()
            self.pinned = False
        self.chunks = []


# Chunks whose unregistration had to wait: a store collected while a CUDA graph is being captured on this
# thread (the garbage collector runs finalizers wherever an allocation triggers it). `cudaHostUnregister`
# is not permitted during a capture (error 900) and would invalidate the capture, so the chunks stay
# alive here until `flush_deferred` (the graph capture calls it when done) or the next unregistration.
_deferred: list[list[torch.Tensor]] = []


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def flush_deferred() -> None:
    """Unregister (and so free) the stores collected during a graph capture; nothing while capturing."""
    if _deferred and not _capturing():
        _unregister([])


def _unregister(chunks: list[torch.Tensor]) -> None:
    if _capturing():
        _deferred.append(list(chunks))
        chunks.clear()
        return
    while True:  # (another thread may take the last one between a check and a pop)
        try:
            held = _deferred.pop()
        except IndexError:
            break
        _unregister_now(held)
    _unregister_now(chunks)


def _unregister_now(chunks: list[torch.Tensor]) -> None:
    cudart = torch.cuda.cudart()
    for c in chunks:
        err = int(cudart.cudaHostUnregister(c.data_ptr()))
        if err != 0:  # the memory is freed regardless; say so rather than fail a close
            log.warning("cudaHostUnregister failed with CUDA error %d for %d bytes of the expert store", err, c.nbytes)
    chunks.clear()
