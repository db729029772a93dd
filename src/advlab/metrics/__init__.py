"""Pure tensor metrics: robustness (accuracy, ASR with a success/failed/detected split, norms),
similarity (MSE, SSIM, MS-SSIM, CW-SSIM), anonymity (rank pmf), detection (ROC, AUC), bound (VIB)."""

from .robustness import (accuracy, robust_accuracy, attack_success_rate, perturbation_norms, l0_norm, l2_norm,
                         linf_norm, is_success, outcome)
from .cwssim import cw_ssim, CWSSIM, SteerablePyramid
from .similarity import mse, ssim, ms_ssim
from .anonymity import label_rank, rank_pmf, satisfies_k_anonymity, k_anonymity_violation

__all__ = ["accuracy", "robust_accuracy", "attack_success_rate", "perturbation_norms", "l0_norm", "l2_norm",
           "linf_norm", "is_success", "outcome"]
__all__ += ["cw_ssim", "CWSSIM", "SteerablePyramid", "label_rank", "rank_pmf", "satisfies_k_anonymity",
            "k_anonymity_violation"]
__all__ += ["mse", "ssim", "ms_ssim"]
from .detection import roc, detection_auc, auc_standard_error, balanced_accuracy, tpr_at_fpr  # noqa: E402
__all__ += ["roc", "detection_auc", "auc_standard_error", "balanced_accuracy", "tpr_at_fpr"]
from .bound import (nearest_other_class, sigma_bound, bound_statistics, visual_bound,  # noqa: E402
                    effectiveness_score, perturbation_magnitude)
__all__ += ["nearest_other_class", "sigma_bound", "bound_statistics", "visual_bound", "effectiveness_score",
            "perturbation_magnitude"]
