"""What an engine reports: one prompt's result (`GenerationOutput`), the engine-wide counters
(`EngineStats`), and the `Engine` methods that assemble them (`EngineTelemetry`, a mixin over the
engine's cache, runtime, prefetcher and predictors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finemoe.types import CacheStats

if TYPE_CHECKING:
    from finemoe.generation import Completion


@dataclass
class GenerationOutput:
    """One prompt's result, with the cache counters accumulated while it ran (shared in a batch)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    ttft_s: float
    tpot_s: float
    latency_s: float
    cache: CacheStats
    policy: str
    token_times_s: list[float] = field(default_factory=list)  # per token, seconds since the start

    def to_dict(self) -> dict[str, Any]:
        c = self.cache
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": len(self.prompt_token_ids),
            "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "latency_s": self.latency_s,
            "hit_rate": c.hit_rate,
            "hits": c.hits,
            "misses": c.misses,
            "bytes_copied": c.bytes_copied,
            "stall_s": c.stall_s,
            "prefetch_precision": c.prefetch_precision,
            "policy": self.policy,
        }


@dataclass
class EngineStats:
    """Engine-wide counters and memory figures (bytes)."""

    policy: str
    device: str
    slots: int
    resident_experts: int
    total_experts: int
    pool_bytes: int
    store_bytes: int
    dense_bytes: int
    cache: CacheStats
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "device": self.device,
            "slots": self.slots,
            "resident_experts": self.resident_experts,
            "total_experts": self.total_experts,
            "pool_bytes": self.pool_bytes,
            "store_bytes": self.store_bytes,
            "dense_bytes": self.dense_bytes,
            **self.cache.to_dict(),
            **self.extra,
        }


class EngineTelemetry:
    """`Engine`'s telemetry methods (see `Engine` for the attributes they read)."""

    def _output(self, c: Completion, delta: CacheStats) -> GenerationOutput:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return GenerationOutput(
            text,
            c.token_ids,
            c.prompt_token_ids,
            c.finish_reason,
            c.ttft_s,
            c.tpot_s,
            c.latency_s,
            delta,
            self.preset.name,
            c.token_times_s,
        )

    def predictor_stats(self) -> dict[str, Any]:
        """Telemetry of the predictor: map-store size and match scores, critical-path time."""
        out: dict[str, Any] = {
            "search": self.search_mode,
            "prefetch_distance": self.distance,
            "predictor_critical_s": self.runtime.critical_s,
            "predictor_critical_decode_s": self.runtime.critical_decode_s,
            "decode_iterations": self.runtime.decode_iterations,
            "predictor_critical_ms_per_decode_iteration": (
                self.runtime.critical_decode_s / self.runtime.decode_iterations * 1e3
                if self.runtime.decode_iterations
                else None
            ),
            "prefetch_wasted_bytes": self.cache.stats.prefetch_wasted_bytes,
        }
        matches = self.runtime.device_matches
        if matches is not None:
            out["device_match_steps"] = matches.steps
            out["device_store_rows_copied"] = matches.rows_copied
            out["device_store_bytes"] = matches.planner.nbytes()
        for p in self.runtime.predictors:
            out.update(p.stats())
        return out

    def stats(self) -> EngineStats:
        self.cache.refresh_stall()
        return EngineStats(
            policy=self.preset.name,
            device=str(self.device),
            slots=self.plan.slots,
            resident_experts=self.cache.resident_count(),
            total_experts=self.spec.num_total_experts,
            pool_bytes=self.plan.pool_bytes,
            store_bytes=self.store.nbytes,
            dense_bytes=self.dense_bytes,
            cache=self.cache.stats.copy(),
            # device bytes beyond the pool: the gather scratch of pools wider than one kernel call
            extra={
                "gather_scratch_bytes": self.runtime.scratch_bytes,
                **(self.runtime.duty.stats() if self.runtime.duty else {"prediction_duty": "always"}),
                **self.prefetcher.window.stats(),
                **self.predictor_stats(),
                **(self.static.stats() if self.static is not None else {"cuda_graphs": False}),
                **self.host_time_stats(),
            },
        )

    def host_time_stats(self) -> dict[str, float]:
        """Where the decode iterations' host time went, seconds in total: blocked in the routing
        syncs, in the predictors (`predictor_critical_decode_s`, above), and in graphed decode the
        layers' serve before their segments' launches, the launch calls and the serve after them
        (0 in eager decode)."""
        rt = self.runtime
        return {
            "decode_sync_s": rt.sync_decode_s,
            "decode_serve_s": rt.serve_decode_s,
            "decode_table_s": rt.table_decode_s,  # (part of the serve)
            "decode_launch_s": rt.launch_decode_s,
            "decode_post_launch_s": rt.post_launch_decode_s,
        }

    def sync_wait_by_layer(self) -> list[float]:
        """Decode host time blocked in each MoE layer's routing sync, seconds in total [L]: in graphed
        decode a layer with almost no wait is one whose host work kept the GPU waiting."""
        return list(self.runtime.sync_layer_decode_s)
