"""Model math per family: plain functions over weight dicts, no device logic.

Each family implements the ``Model`` protocol in ``base.py``; ``MODELS`` maps a
``ModelConfig.family`` to its implementation.
"""
from .base import MODELS, Model, StepContext, get_model

__all__ = ["MODELS", "Model", "StepContext", "get_model"]
