"""Evaluation: the honest-evaluation battery (:func:`evaluate`), accuracy-vs-eps sweeps
(:func:`eps_sweep`), same-conditions comparisons of defenses (:func:`compare`), the attack runner,
masking checks, experiment specs and reports."""

from .evaluate import BATTERY, EvaluationResult, evaluate
from .sweep import SweepResult, eps_sweep
from .compare import Comparison, compare  # noqa: E402 - after evaluate, which it uses

__all__ = ["evaluate", "EvaluationResult", "BATTERY", "eps_sweep", "SweepResult", "compare", "Comparison"]
