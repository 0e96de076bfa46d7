"""Exceptions raised at finemoe's boundaries.

Every error says what is wrong and how to fix it; none of them leaves partial state behind.
"""

from __future__ import annotations


class FineMoEError(Exception):
    """Base class of every error finemoe raises on purpose."""


class CheckpointError(FineMoEError):
    """The model directory is missing, incomplete or corrupt."""


class UnsupportedModelError(FineMoEError):
    """The checkpoint is not a MoE model, or its family has no adapter."""


class BudgetError(FineMoEError):
    """The expert budget cannot be parsed or cannot run the model."""


class ConfigError(FineMoEError):
    """An engine or sampling option has an invalid value."""
