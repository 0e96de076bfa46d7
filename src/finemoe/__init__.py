"""finemoe: lossless expert offloading for Mixture-of-Experts LLMs."""

from finemoe.config import EngineConfig, ExpertBudget, SamplingParams
from finemoe.engine import Engine
from finemoe.errors import BudgetError, CheckpointError, ConfigError, FineMoEError, UnsupportedModelError
from finemoe.telemetry import EngineStats, GenerationOutput

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
