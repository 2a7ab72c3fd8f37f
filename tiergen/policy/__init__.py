"""Placement policies (and, later, the cost model and policy search)."""
from .policy import Policy, split_rows

__all__ = ["Policy", "split_rows"]
