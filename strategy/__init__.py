"""From measurements to a per-tensor plan: the strategy file format and the allocators that fill it."""

from strategy.plan import Plan, PlanError, Rule, TensorChoice, load_plan, save_plan, validate_plan

__all__ = ["Plan", "PlanError", "Rule", "TensorChoice", "load_plan", "save_plan", "validate_plan"]
