"""Named policies: an eviction policy plus a predictor (what `--policy` selects).

The baselines reproduce what the FineMoE paper compared against (spec §4, baseline harness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finemoe.errors import ConfigError


@dataclass(frozen=True)
class PolicyPreset:
    name: str
    eviction: str  # key of policy.EVICTION_POLICIES
    predictor: str  # name for predictor.make_predictor
    all_resident: bool
    description: str
    distance: int | None = None  # fixed prefetch distance / stride; None: the configured one
    default_distance: int = 1  # used when neither the preset nor the config fixes it
    asynchronous: bool = False  # the predictor may run on the searcher thread
    adaptive_duty: bool = False  # may stop predicting while that shortens the step (finemoe; baselines stay faithful)
    refine_stride: int = 0  # > 0: also speculate layer l+s's router on layer l's input (synchronous)
    prefill_plans: str = "maps"  # what config prefill_plans "auto" means for a finemoe predictor
    prefill_sweep: bool = False  # what config prefill_eviction "auto" means (finemoe; baselines stay faithful)
    predict_after_demand: bool = False  # what config prefill_predict "auto" means (finemoe; baselines stay faithful)


DEFAULT_POLICY = "finemoe"

PRESETS: dict[str, PolicyPreset] = {
    p.name: p
    for p in (
        PolicyPreset(
            "finemoe",
            "decay-lfu",
            "finemoe",
            False,
            "FineMoE expert maps (semantic + trajectory match, δ-sized prefetch d layers ahead) refined by "
            "the next layer's router on the current hidden state; decayed-frequency eviction",
            default_distance=3,
            asynchronous=True,
            adaptive_duty=True,
            refine_stride=1,
            prefill_plans="gate",
            prefill_sweep=True,
            predict_after_demand=True,
        ),
        PolicyPreset(
            "finemoe-paper",
            "map-lfu",
            "finemoe",
            False,
            "FineMoE as the paper specifies it: expert maps matched by prompt semantics and routing "
            "trajectory, δ-sized prefetch d layers ahead, map-aware LFU eviction",
            default_distance=3,
            asynchronous=True,
            adaptive_duty=True,
        ),
        PolicyPreset("all-gpu", "lru", "none", True, "every expert resident on the device: the no-offload reference"),
        PolicyPreset(
            "on-demand",
            "lru",
            "none",
            False,
            "no prefetch, every miss loaded when the router asks, LRU eviction (the paper's DeepSpeed-Inference role)",
        ),
        PolicyPreset(
            "mixtral-offloading",
            "lru",
            "speculative-gate",
            False,
            "layer l+1's router applied to layer l's hidden state, its top-k prefetched; LRU eviction",
            distance=1,
        ),
        PolicyPreset(
            "promoe",
            "lru",
            "speculative-gate",
            False,
            "stride-2 speculation: layer l+2's router on layer l's hidden state (the paper's ProMoE "
            "re-implementation); LRU eviction",
            distance=2,
        ),
        PolicyPreset(
            "moe-infinity",
            "lfu",
            "moe-infinity",
            False,
            "request-level activation matrix matched against past requests; top E/4 experts of the next "
            "d layers prefetched; LFU eviction",
            default_distance=3,
        ),
        PolicyPreset("lru", "lru", "none", False, "on-demand loading, least-recently-used eviction"),
        PolicyPreset("lfu", "lfu", "none", False, "on-demand loading, least-frequently-used eviction"),
        PolicyPreset(
            "previous-token",
            "lru",
            "previous-token",
            False,
            "prefetch, d layers ahead, the experts each layer used for the previous token; LRU eviction",
        ),
    )
}


def get_preset(name: str) -> PolicyPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; choose one of: {', '.join(PRESETS)}") from None


HISTORY_READERS = ("finemoe", "moe-infinity")  # predictors that match against recorded history
REQUEST_READERS = ("moe-infinity",)  # predictors that match against past requests' activation matrices


def records_requests(preset: PolicyPreset, config: Any) -> bool:
    """Whether the history recorder keeps finished requests' activation matrices: as configured
    (`EngineConfig.record_requests`), else (auto) where a predictor reads them or a map-store
    file will carry them."""
    if config.record_requests is not None:
        return bool(config.record_requests)
    return preset.predictor in REQUEST_READERS or bool(config.map_store)


def prefetch_distance(preset: PolicyPreset, configured: int | None) -> int:
    """The distance (or stride) a preset plans at: its fixed one, else the configured, else its default."""
    return preset.distance or configured or preset.default_distance


def predictor_members(preset: PolicyPreset, config: Any, deps: Any, all_resident: bool) -> list:
    """The predictors a preset runs, in order, as one (possibly asynchronous) chain: the preset's
    own (unless everything is resident), the refining speculative gate (finemoe: layer l+1's
    router on layer l's router input, run where the chain runs, so on the searcher thread when
    search is asynchronous), then the history recorder when the stores learn online (a policy
    that reads history, or any run with a map-store file; finished requests' activation matrices
    only where `records_requests`). Shared by the engine and the simulator."""
    import dataclasses

    from finemoe.history import HistoryRecorder
    from finemoe.predictor import make_predictor

    members = []
    deps = dataclasses.replace(deps, prefill_plans=prefill_plans(preset, config.prefill_plans))
    if preset.predictor != "none" and not all_resident:
        members.append(make_predictor(preset.predictor, deps))
        if preset.refine_stride and config.gate_refine and deps.gate is not None:
            members.append(make_predictor("speculative-gate", dataclasses.replace(deps, distance=preset.refine_stride)))
    if config.map_store_learn and (preset.predictor in HISTORY_READERS or config.map_store):
        kept = deps if records_requests(preset, config) else dataclasses.replace(deps, requests=None)
        members.append(HistoryRecorder(kept))
    return members


def prefill_plans(preset: PolicyPreset, configured: str) -> str:
    """What a preset's predictors plan in prefill iterations: "maps", "gate" or "none" (see
    config.PREFILL_PLANS). Only finemoe's predictors read it; every other preset plans prefill as
    it plans decode."""
    if preset.predictor != "finemoe":
        return "maps"
    return preset.prefill_plans if configured == "auto" else configured


def reads_router_inputs(preset: PolicyPreset, config: Any) -> bool:
    """True if the preset's predictors read router inputs (speculative gates)."""
    return preset.predictor == "speculative-gate" or bool(preset.refine_stride and config.gate_refine)


def prefill_sweep(preset: PolicyPreset, config: Any) -> bool:
    """True if prefill iterations evict from the layers already served first (`ExpertCache`)."""
    if config.prefill_eviction == "auto":
        return preset.prefill_sweep
    return config.prefill_eviction == "sweep"


def predict_after_demand(preset: PolicyPreset, config: Any) -> bool:
    """True if a prefill layer's predictors run once its on-demand copies are issued (`Stepper.serve`)
    rather than in the router hook before them."""
    if config.prefill_predict == "auto":
        return preset.predict_after_demand
    return config.prefill_predict == "after-demand"


def adaptive_prefetch_window(preset: PolicyPreset, config: Any, all_resident: bool) -> bool:
    """True if the prefetch window follows the link (`prefetch_window` "link") for a policy that
    prefetches at all (no predictor or every expert resident: nothing to window)."""
    return config.prefetch_window == "link" and not all_resident and preset.predictor != "none"
