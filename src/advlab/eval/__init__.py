"""Evaluation: the honest-evaluation battery (:func:`evaluate`), accuracy-vs-eps sweeps
(:func:`eps_sweep`), the attack runner, masking
checks, experiment specs, reports and the paper reproductions."""

from .evaluate import BATTERY, EvaluationResult, evaluate
from .sweep import SweepResult, eps_sweep

__all__ = ["evaluate", "EvaluationResult", "BATTERY", "eps_sweep", "SweepResult"]
