"""Model-family adapters and the lookup by `config.model_type`."""

from __future__ import annotations

from finemoe.errors import UnsupportedModelError
from finemoe.models.base import FamilyAdapter
from finemoe.models.families import ALL

ADAPTERS: dict[str, FamilyAdapter] = {a.model_type: a for a in ALL}


def supported_families() -> str:
    return ", ".join(f"{a.display_name} ({a.model_type})" for a in ALL)


def get_adapter(model_type: str) -> FamilyAdapter:
    """The adapter for `model_type`; raises UnsupportedModelError listing the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by finemoe; supported MoE families: {supported_families()}"
        ) from None


__all__ = ["ADAPTERS", "FamilyAdapter", "get_adapter", "supported_families"]
