"""finemoe: lossless expert offloading for Mixture-of-Experts LLMs."""

from finemoe import _native

# Before any submodule: route hot modules whose compiled build is missing, stale or switched off
# (FINEMOE_PURE_PYTHON=1) to their sources (`_native`).
_native.select(__path__)

from finemoe.config import EngineConfig, ExpertBudget, SamplingParams  # noqa: E402
from finemoe.engine import Engine  # noqa: E402
from finemoe.errors import BudgetError, CheckpointError, ConfigError, FineMoEError, UnsupportedModelError  # noqa: E402
from finemoe.telemetry import EngineStats, GenerationOutput  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "ExpertBudget",
    "FineMoEError",
    "GenerationOutput",
    "SamplingParams",
    "UnsupportedModelError",
    "__version__",
]
