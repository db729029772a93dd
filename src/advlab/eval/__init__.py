"""Evaluation: the honest-evaluation battery (:func:`evaluate`), the attack runner, masking
checks, experiment specs, reports and the paper reproductions."""

from .evaluate import BATTERY, EvaluationResult, evaluate

__all__ = ["evaluate", "EvaluationResult", "BATTERY"]
