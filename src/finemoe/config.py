"""Frozen configuration values and their validation. No CUDA calls, no transformers import."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from finemoe.errors import BudgetError, ConfigError
from finemoe.types import MoESpec

# On-demand misses from which a layer issues its copies in runs (`ExpertCache`, CUDA): a decode step's
# too (session 17, H200, 25%: finemoe's TPOT -4% on Qwen3, lru's within noise; docs/results/gpu_trace.md)
EARLY_ISSUE_MISSES = 2

log = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]?i?b)?\s*$", re.IGNORECASE)

BUDGET_HELP = (
    "an expert budget is a slot count ('96'), a size ('8GiB', '512MB') or a share of all routed experts ('25%')"
)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"


@dataclass(frozen=True)
class ExpertBudget:
    """The user's device memory budget for routed experts, in one of three units."""

    kind: str  # "slots" | "bytes" | "fraction"
    value: float

    @classmethod
    def parse(cls, text: str | int | float | ExpertBudget) -> ExpertBudget:
        if isinstance(text, ExpertBudget):
            return text
        if isinstance(text, bool):
            raise BudgetError(f"invalid expert budget {text!r}: {BUDGET_HELP}")
        if isinstance(text, int):
            return cls("slots", float(text))
        if isinstance(text, float):
            if not 0 < text <= 1:
                raise BudgetError(f"a float expert budget is a share in (0, 1], got {text}; {BUDGET_HELP}")
            return cls("fraction", text)
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise BudgetError(f"invalid expert budget {text!r}: {BUDGET_HELP}")
        number, unit = float(m.group(1)), (m.group(2) or "").lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise BudgetError(f"expert budget {text!r} must be a share in (0%, 100%]")
            return cls("fraction", number / 100)
        if unit == "":
            if number != int(number):
                raise BudgetError(f"expert budget {text!r}: a slot count must be a whole number")
            return cls("slots", number)
        return cls("bytes", number * _UNITS[unit])

    def __str__(self) -> str:
        if self.kind == "fraction":
            return f"{self.value * 100:g}%"
        if self.kind == "bytes":
            return format_bytes(self.value)
        return f"{int(self.value)} slots"


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget maps onto a model: the slot count S of the device pool, and why."""

    slots: int
    expert_bytes: int
    total_experts: int
    all_resident: bool

    @property
    def pool_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def fraction(self) -> float:
        return self.slots / self.total_experts

    @classmethod
    def make(cls, budget: ExpertBudget, spec: MoESpec) -> BudgetPlan:
        """Turn a budget into slots; refuse one that cannot hold one layer's top-k for one token."""
        total = spec.num_total_experts
        if budget.kind == "slots":
            slots = int(budget.value)
        elif budget.kind == "bytes":
            slots = int(budget.value // spec.expert_bytes)
        else:
            slots = int(budget.value * total + 1e-9)
        if slots < spec.top_k:
            need = spec.top_k * spec.expert_bytes
            raise BudgetError(
                f"expert budget {budget} holds {slots} expert(s) of {format_bytes(spec.expert_bytes)}, but "
                f"one MoE layer needs its top-k = {spec.top_k} experts resident at once for a single token "
                f"({format_bytes(need)}); raise the budget to at least {spec.top_k} slots, "
                f"{format_bytes(need)} or {100 * spec.top_k / total:.3g}%"
            )
        if slots >= total:
            if slots > total:
                log.warning(
                    "expert budget %s exceeds the model's %d routed experts (%s); keeping every "
                    "expert resident on the device",
                    budget,
                    total,
                    format_bytes(spec.total_expert_bytes),
                )
            return cls(total, spec.expert_bytes, total, True)
        return cls(slots, spec.expert_bytes, total, False)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy. `seed` makes sampling reproducible."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS tokens
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DTYPES = ("float32", "float16", "bfloat16")
# where FineMoE's map search runs; "device": graphed decode steps match on the GPU in small graphs
# beside their segments (CUDA, batch 1; docs/design/device_plans.md), everything else searches inline as "sync"
SEARCH_MODES = ("auto", "sync", "async", "process", "device")
# finemoe's plans in prefill iterations: "maps" (expert maps matched per prompt token, plus the
# refining gate), "gate" (the refining gate alone), "none" (prefill loads on demand); auto: the
# policy's (finemoe "gate", finemoe-paper "maps"; docs/design/finemoe.md, ambiguity 4)
PREFILL_PLANS = ("auto", "maps", "gate", "none")
PREFILL_EVICTION = ("auto", "sweep", "policy")  # prefill_eviction
# when a prefill layer's predictors run: "before" its on-demand copies are issued (in the router hook, the
# baselines' order) or "after-demand" (once they are issued: their host work overlaps the copies);
# auto: the policy's (finemoe after-demand, the others before)
PREFILL_PREDICT = ("auto", "before", "after-demand")
DUTY_MODES = ("auto", "always", "adaptive")  # prediction_duty; auto: adaptive on CUDA devices, always elsewhere


@dataclass(frozen=True)
class EngineConfig:
    """Everything `Engine.from_pretrained` needs besides the model path."""

    expert_budget: ExpertBudget = ExpertBudget("fraction", 0.5)
    policy: str = "finemoe"
    device: str = "auto"  # "auto" picks cuda when available
    dtype: str | None = None  # None keeps the checkpoint's dtype
    prefetch_distance: int | None = None  # layers ahead a predictor plans for; None: the policy's default
    max_inflight_prefetches: int = 4  # speculative copies outstanding at once (at most)
    # False: the predictors still plan (their host time, their plans' eviction hints and protection)
    # but no prefetch copy starts: a diagnostic that separates the predictor's host cost from its copies
    prefetch_copies: bool = True
    prefetch_window: str = "link"  # "link": in flight only what the link copies in a layer's time; "fixed": the max
    progress: bool = True
    map_store: str | None = None  # file to warm-start the history stores from and save them to at close
    map_store_capacity: int = 1000  # C, expert maps kept (and past requests, for moe-infinity)
    map_store_learn: bool = True  # insert every iteration's maps (online); False freezes the store
    delta_rule: str = "paper"  # "paper" (include the expert crossing δ), "demo" (cumsum <= δ), "topk" (no δ)
    gate_refine: bool = True  # finemoe: also speculate the next layer's router (False: maps only)
    semantic_search: bool = True  # FineMoE plans layers 0..d-1 from the semantic match (False: ablation)
    map_values: str = "probs"  # expert maps hold router "probs" (paper) or top-k "counts" (hit-count ablation)
    # "sync" (forward pass), "async" (thread), "process" (worker), "device" (GPU); "auto": "device" where
    # it can run (a map predictor, graphed decode on CUDA, probability maps over the whole prefix), else
    # "sync" (docs/design/device_plans.md: the fast near-100% configuration of the H200 runs)
    search: str = "auto"
    prediction_duty: str = "auto"  # "always" or "adaptive" (predict while it shortens the step); auto: duty_applies
    trajectory_window: int = 0  # layers the trajectory match compares: 0 = all so far (paper), w = latest w
    trajectory_candidates: int = 64  # decode: follow only the K maps leading after layer 4 (0: all, the paper)
    # batch-1 decode plans target m + d from the trajectory through layer m - lag (1: what a match computed on
    # the GPU beside the next layer delivers, docs/design/device_plans.md; 0: through m, the paper)
    trajectory_lag: int = 0
    map_min_score: float = 0.0  # finemoe: plan from a matched map only if its match score reaches this (0: always)
    map_min_precision: float = 0.0  # finemoe: withhold map plans while their measured precision is below this
    map_store_rows: str = "all"  # prefill tokens stored as maps: "all" (the authors' demo) or "last" per prompt
    prefill_plans: str = "auto"  # finemoe in prefill: "maps", "gate" or "none" (PREFILL_PLANS); auto: the policy's
    eviction: str | None = None  # override the policy's eviction (policy.EVICTION_POLICIES); None: the policy's own
    # victims in a prefill iteration: "sweep" (layers the pass has served first, `ExpertCache`), "policy"
    # (the eviction policy's order throughout); auto: the policy's (finemoe sweeps, the baselines do not)
    prefill_eviction: str = "auto"
    prefill_predict: str = "auto"  # PREFILL_PREDICT: a prefill layer's predictors before or after its demand copies
    # a layer with at least this many on-demand misses issues its copies in runs of 1, 4, 16, ... while
    # it still picks victims (CUDA); 2 = decode steps too, 16 = prefill layers only, 0 = all at once
    early_issue_misses: int = EARLY_ISSUE_MISSES
    # one prompt at a time: a static KV cache, decode steps replayed from CUDA graphs cut at the
    # routers (graphs.py); None: on for CUDA devices; True without CUDA: the static cache, eager steps
    cuda_graphs: bool | None = None
    # graphed decode: the speculative gates' probabilities computed on the device (a small matmul
    # and the routing function per layer, in the layer's side graph replayed beside the next
    # segment, copied into pinned host rows; session 27), instead of on the host from a copy of the
    # router input (graphs.py). None (auto): on where the map search runs on the device (search
    # "device", or "auto" resolved to it): with the side graphs' gates skipped where their targets run
    # ahead, the 99% step is +0.13-0.19 ms over lru:gather on the H200 (sessions 31-33); the gates on
    # the host were 0.08 ms slower (session 31, docs/design/device_plans.md)
    graph_gates: bool | None = None
    # fill the pool's free slots when the engine is set up, whole layers first (`ExpertCache.fill_free`),
    # instead of letting first uses load them one miss at a time (the simulator starts its replay from
    # the same fill, landed). None (auto): on where decode steps are graphed (the engine on CUDA with
    # cuda_graphs not off; the simulator's graphed replay): a start-up of one copy per free slot buys
    # whole layers from the first token, which graphed steps run ahead of their routing syncs
    # (docs/design/device_plans.md, session 29); off for eager steps, as before
    warm_pool: bool | None = None
    # when fewer experts than layers are absent (a budget near 100%), a victim in a layer already
    # missing an expert goes first if it is among the eviction policy's next few choices, so whole
    # layers stay whole and graphed decode runs ahead of their routing syncs (`ExpertCache.keep_whole`,
    # runahead.py; decayed LFU only). Off by default: fewer such layers in the simulator at the same
    # hit rate, not yet measured to pay in the engine (docs/design/device_plans.md, session 30)
    keep_whole_layers: bool = False
    # near 100% the absent experts gather in the last MoE layers, as many as hold them at up to a third
    # of each, while that is at most a quarter of the layers (`victims.sink_layers`): victims come from
    # them first (the policy's order there), and each decode iteration starts by copying back what
    # earlier layers miss (`ExpertCache.gather`). Every earlier layer is then whole, and a graphed
    # decode step runs ahead of all routing syncs but the sink layers' (runahead.py). None (auto): on
    # where decode steps are graphed (the engine on CUDA with cuda_graphs not off; the simulator's
    # graphed replay), off elsewhere: -0.3 to -0.5 ms per finemoe step on the H200 (reference shape,
    # 99%), and with a routing sync priced the simulator has it pay on every shape near 100%, while an
    # eager step pays its copies and misses for nothing (docs/results/simulator.md, "The routing
    # sync's own cost")
    gather_absent: bool | None = None
    # whether the history recorder keeps each finished request's expert activation matrix (the
    # request store, moe-infinity's history; `map_store_learn` must be on too). None (auto): where
    # something reads them: a policy that matches past requests (`presets.REQUEST_READERS`), or a
    # `map_store` path configured (the file, saved at close, then serves any policy later). A finemoe
    # engine without a file skips the per-layer counts (~7 µs of host per layer on the H200). Decided
    # per configuration: a session that learns under finemoe without a file, then `reconfigure`s to
    # moe-infinity, starts moe-infinity with the requests recorded so far (none from the finemoe phase)
    record_requests: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.record_requests is not None and not isinstance(self.record_requests, bool):
            raise ConfigError(f"record_requests must be true, false or null (auto), got {self.record_requests!r}")
        if self.prediction_duty not in DUTY_MODES:
            raise ConfigError(f"prediction_duty must be one of {', '.join(DUTY_MODES)}, got {self.prediction_duty!r}")
        if self.search not in SEARCH_MODES:
            raise ConfigError(f"search must be one of {', '.join(SEARCH_MODES)}, got {self.search!r}")
        if self.delta_rule not in ("paper", "demo", "topk"):
            raise ConfigError(f"delta_rule must be paper, demo or topk, got {self.delta_rule!r}")
        if self.prefill_plans not in PREFILL_PLANS:
            raise ConfigError(f"prefill_plans must be one of {', '.join(PREFILL_PLANS)}, got {self.prefill_plans!r}")
        if self.prefill_eviction not in PREFILL_EVICTION:
            raise ConfigError(
                f"prefill_eviction must be one of {', '.join(PREFILL_EVICTION)}, got {self.prefill_eviction!r}"
            )
        if self.prefill_predict not in PREFILL_PREDICT:
            raise ConfigError(
                f"prefill_predict must be one of {', '.join(PREFILL_PREDICT)}, got {self.prefill_predict!r}"
            )
        if self.map_values not in ("probs", "counts"):
            raise ConfigError(f"map_values must be probs or counts, got {self.map_values!r}")
        if self.map_store_rows not in ("all", "last"):
            raise ConfigError(f"map_store_rows must be all or last, got {self.map_store_rows!r}")
        if not 0.0 <= self.map_min_precision <= 1.0:
            raise ConfigError(f"map_min_precision must be in [0, 1], got {self.map_min_precision}")
        if not 0.0 <= self.map_min_score <= 1.0:
            raise ConfigError(f"map_min_score must be in [0, 1], got {self.map_min_score}")
        if self.trajectory_candidates < 0:
            raise ConfigError(f"trajectory_candidates must be >= 0, got {self.trajectory_candidates}")
        if self.trajectory_lag not in (0, 1):
            raise ConfigError(f"trajectory_lag must be 0 or 1, got {self.trajectory_lag}")
        if self.trajectory_window < 0:
            raise ConfigError(f"trajectory_window must be >= 0, got {self.trajectory_window}")
        if self.map_store_capacity < 1:
            raise ConfigError(f"map_store_capacity must be >= 1, got {self.map_store_capacity}")
        if self.prefetch_distance is not None and self.prefetch_distance < 1:
            raise ConfigError(f"prefetch_distance must be >= 1, got {self.prefetch_distance}")
        if self.early_issue_misses < 0:
            raise ConfigError(f"early_issue_misses must be >= 0 (0: off), got {self.early_issue_misses}")
        if self.max_inflight_prefetches < 1:
            raise ConfigError(f"max_inflight_prefetches must be >= 1, got {self.max_inflight_prefetches}")
        if self.prefetch_window not in ("link", "fixed"):
            raise ConfigError(f"prefetch_window must be link or fixed, got {self.prefetch_window!r}")
