"""DeepFool (Moosavi-Dezfooli et al. 2016), multi-class L2 version, batched over samples and over
the candidate classes."""

from __future__ import annotations

from typing import Optional

import torch

from .._util import AdvlabError, check_nonneg, check_positive_int
from .base import Attack
from .logits import keep_if_adversarial
from .loop import check_interval, logit_grads


class DeepFool(Attack):
    """DeepFool L2: linearise the decision boundaries of the ``num_candidates`` top classes of the
    clean logits, step to the nearest one, repeat until the prediction changes (at most ``steps``
    steps). The total perturbation is scaled by ``1 + overshoot`` and the image clamped to [0, 1]
    at every step. Per step: one forward and the gradients of all K-1 logit differences for the
    whole active batch at once. A fooled sample's iterate is frozen from then on, and it leaves the
    batch at the next check, every ``check_every`` steps (the attack's only host synchronisations
    inside the loop; the result does not depend on them; None: every step on the CPU, every
    :data:`~advlab.attacks.loop.ACCELERATOR_CHECK_EVERY` on a GPU). Untargeted only.
    """

    norm = None
    supports_targeted = False

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, num_candidates: int = 10,
                 check_every: Optional[int] = None):
        super().__init__(model)
        self.steps = check_positive_int(steps, "steps")
        self.overshoot = check_nonneg(overshoot, "overshoot")
        self.num_candidates = check_positive_int(num_candidates, "num_candidates", minimum=2)
        self.check_every = None if check_every is None else check_positive_int(check_every, "check_every")

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        out = x.clone()
        # active set
        idx = torch.arange(n, device=x.device)
        x0, xa, lab = x, x.clone(), y
        cand = None
        r_tot = torch.zeros_like(x)

        def weights(logits):
            # the candidates: the top num_candidates - 1 clean classes other than y (set at step 0);
            # weights[j, i] = e_{cand[i, j]} - e_{y_i}: the gradients of the logit differences
            nonlocal cand
            if cand is None:
                k = min(self.num_candidates, logits.shape[1]) - 1
                if k < 1:
                    raise AdvlabError("DeepFool needs a model with at least 2 classes")
                cand = logits.scatter(1, lab[:, None], float("-inf")).topk(k, dim=1).indices
            eye = torch.eye(logits.shape[1], device=x.device, dtype=x.dtype)
            return (eye[cand] - eye[lab][:, None]).transpose(0, 1)

        done = torch.zeros(n, dtype=torch.bool, device=x.device)  # fooled: frozen until it leaves
        check_every = check_interval(self.check_every, x.device)
        for step in range(self.steps + 1):
            if step == self.steps:  # only the check of the last iterate remains
                with torch.no_grad():
                    done = done | (self.model(xa).argmax(1) != lab)
                out[idx] = torch.where(done.view(view), xa, out[idx])
                break
            logits, grads = logit_grads(self.model, xa, weights)
            done = done | (logits.argmax(1) != lab)
            # the fooled samples leave at a check (the loop's only host synchronisation); until
            # then they ride along with their iterate frozen
            if step % check_every == 0 and bool(done.any()):
                out[idx[done]] = xa[done]
                k_ = (~done).nonzero().squeeze(1)
                if k_.numel() == 0:
                    break
                idx, x0, xa, lab, cand, r_tot = idx[k_], x0[k_], xa[k_], lab[k_], cand[k_], r_tot[k_]
                logits, grads, done = logits[k_], grads[:, k_], done[k_]
            m = idx.shape[0]
            f = logits.gather(1, cand) - logits.gather(1, lab[:, None])         # (m, K-1), < 0
            gn = grads.flatten(2).norm(dim=2).t()                               # (m, K-1)
            best = (f.abs() / (gn + 1e-8)).argmin(1)                            # nearest boundary
            ar = torch.arange(m, device=x.device)
            g_best = grads[best, ar]                                            # (m, ...)
            f_best = f[ar, best].abs()
            n_best = gn[ar, best]
            r_step = ((f_best + 1e-4) / (n_best + 1e-8) ** 2).masked_fill_(done, 0.0)
            r_tot = r_tot + r_step.view(view) * g_best
            xa = (x0 + (1 + self.overshoot) * r_tot).clamp_(0.0, 1.0)
        return keep_if_adversarial(self.model, out, x, y, None)
