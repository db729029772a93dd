"""advlab: adversarial robustness of image classifiers, in PyTorch.

Attack, defend, detect, and measure it honestly. Subpackages follow one import chain:
``nn -> data -> models -> metrics -> train -> attacks -> defenses -> adaptive -> eval -> papers -> cli``
(checked by import-linter: ``lint-imports``, contracts in pyproject.toml).
"""

__version__ = "0.1.0"

#: Prediction value of a defended classifier that abstains (M-SVDD-D's adversarial class,
#: I-defender's rejection).
REJECT = -1

__all__ = ["__version__", "REJECT"]
