"""evaluate against defenses that reject or mask: the decision probe, the attacker-success
measure the outcome checks compare, the rejections-absorbed flag and the escalation rounds."""

import pytest
import torch
from torch import nn

from advlab import REJECT
from advlab.adaptive import can_reject
from advlab.defenses import Defense
from advlab.eval import evaluate
from advlab.exam.gallery import GaussianNoise

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = 7  # the clean images of the grid rejector hold multiples of 1/7, away from 0 and 1


def _tiny(classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()


def _grid_images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, GRID, (n, 1, 8, 8), generator=g).float() / GRID


class BlankRejector(Defense):
    """Accepts every ordinary image; rejects a blank one (the kind of decision only a probe shows)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024):
        cls = self.model(x).argmax(1)
        return torch.where(x.flatten(1).amax(1) < 1e-3, torch.full_like(cls, REJECT), cls)


class GridRejector(BlankRejector):
    """Rejects every image with a pixel off the 1/7 grid: whatever an attack moves, it rejects."""

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024):
        cls = self.model(x).argmax(1)
        off = ((x * GRID - (x * GRID).round()).abs() > 1e-3).flatten(1).any(1)
        return torch.where(off, torch.full_like(cls, REJECT), cls)


def test_can_reject_probes_a_decision_that_accepts_every_clean_image():
    m = _tiny()
    x = _grid_images()
    assert not bool((BlankRejector(m).predict(x) == REJECT).any())
    assert can_reject(BlankRejector(m), x)
    # no decision of its own, or an adversarial column: nothing to probe
    assert not can_reject(m, x)

    class Plain(Defense):
        def __init__(self):
            super().__init__()
            self.model = m

        def forward(self, x):
            return self.model(x)

    assert not can_reject(Plain(), x)


def test_rejections_absorbed_is_flagged_and_escalation_stops_when_nothing_moves():
    m = _tiny()
    x = _grid_images()
    y = m(x).argmax(1)
    res = evaluate(GridRejector(m), x, y, eps=0.1, steps=10, square_queries=20, targets=2, escalate=3,
                   progress=False)
    names = [f.name for f in res.flags]
    assert "rejects-inputs" in names and "rejections-absorbed" in names
    # every image the attacks moved is rejected: robust accuracy 0, all detected, nothing accepted as wrong
    assert res.robust_accuracy == 0.0 and res.detected == 1.0
    assert set(res.status) == {"detected"}
    # the masking flag escalated once; the round moved nothing, so it was the last
    assert [r["round"] for r in res.rounds] == [1] and res.rounds[0]["newly_broken_or_rejected"] == 0
    assert "APGD-DLR (round 1)" in res.rounds[0]["attacks"]
    assert list(res.per_attack)[-1] == "round 1"


def test_randomized_defense_escalates_with_new_seeds():
    m = _tiny()
    x = _grid_images(16)
    y = m(x).argmax(1)
    res = evaluate(GaussianNoise(m, sigma=0.3), x, y, eps=0.05, steps=5, square_queries=10, targets=2,
                   escalate=2, eot_samples=2, progress=False)
    assert "randomized" in [f.name for f in res.flags]
    assert 1 <= len(res.rounds) <= 2
    assert [r["seed"] for r in res.rounds] == [1000 * r["round"] for r in res.rounds]
    assert all(r["square_queries"] == 20 for r in res.rounds)
    assert any("EoT" in n for n in res.notes)
    # the rounds only add attacks: the worst case never goes up
    accs = list(res.per_attack.values())
    assert all(a >= b - 1e-12 for a, b in zip(accs, accs[1:]))
