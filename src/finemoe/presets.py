"""Named policies: an eviction policy plus a predictor (what `--policy` selects)."""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import ConfigError


@dataclass(frozen=True)
class PolicyPreset:
    name: str
    eviction: str  # key of policy.EVICTION_POLICIES
    predictor: str  # key of predictor.PREDICTORS
    all_resident: bool
    description: str


PRESETS: dict[str, PolicyPreset] = {
    p.name: p
    for p in (
        PolicyPreset("all-gpu", "lru", "none", True, "every expert resident on the device: the no-offload reference"),
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
