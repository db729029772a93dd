"""Threat-model geometry (advlab.attacks.geometry): the exact L-inf box, the L2 projection and the
norm names, on small tensors with hand-computed answers (sharp enough for mutation testing,
benchmarks/mutation.py)."""

import math

import pytest
import torch

from advlab._util import AdvlabError
from advlab.attacks.geometry import check_norm, linf_box, project


def below(v: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(v, torch.full_like(v, -math.inf))


def above(v: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(v, torch.full_like(v, math.inf))


# ---------------------------------------------------------------------------- linf_box

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.1, 0.25, 0.3, 8 / 255])
def test_linf_box_is_exact_and_tight(dtype, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(500, generator=g, dtype=dtype), torch.tensor([0.0, 1.0, 0.5, 0.75, 0.25], dtype=dtype)])
    x = x.view(5, 1, 101)
    lo, hi = linf_box(x, eps)
    assert lo.dtype == hi.dtype == dtype and lo.shape == hi.shape == x.shape
    # inside the ball, exactly (real arithmetic: float64 differences of floats are exact here)
    xd, lod, hid = x.double(), lo.double(), hi.double()
    if dtype == torch.float32:
        assert bool(((xd - lod) <= eps).all()) and bool(((hid - xd) <= eps).all())
    else:
        assert bool(((x - lo) <= eps).all()) and bool(((hi - x) <= eps).all())
    # and inside the box
    assert bool((lo >= 0).all()) and bool((hi <= 1).all()) and bool((lo <= x).all()) and bool((hi >= x).all())
    if dtype == torch.float32:
        # tight: one float further out leaves the ball (or the box)
        lo_out, hi_out = below(lo), above(hi)
        assert bool((((xd - lo_out.double()) > eps) | (lo_out < 0)).all())
        assert bool((((hi_out.double() - xd) > eps) | (hi_out > 1)).all())
    else:
        # float64 arithmetic is the judge here: within a few floats of x -/+ eps
        assert bool(((lo - (x - eps).clamp(min=0)).abs() <= 4e-16).all())
        assert bool(((hi - (x + eps).clamp(max=1)).abs() <= 4e-16).all())


def test_linf_box_on_exactly_representable_values():
    x = torch.tensor([0.5, 0.25, 0.75, 0.0, 1.0, 0.125])
    lo, hi = linf_box(x, 0.25)
    assert lo.tolist() == [0.25, 0.0, 0.5, 0.0, 0.75, 0.0]
    assert hi.tolist() == [0.75, 0.5, 1.0, 0.25, 1.0, 0.375]
    lo, hi = linf_box(x.double(), 0.25)
    assert lo.tolist() == [0.25, 0.0, 0.5, 0.0, 0.75, 0.0]
    assert hi.tolist() == [0.75, 0.5, 1.0, 0.25, 1.0, 0.375]


def test_linf_box_rounds_inward_where_float32_rounds_outward():
    # 0.1 is not a float: x - 0.1 rounded to nearest lands outside the ball for some x
    x = torch.linspace(0.2, 0.8, 1001)
    naive = (x - 0.1)
    assert bool(((x.double() - naive.double()) > 0.1).any())  # the problem is real
    lo, hi = linf_box(x, 0.1)
    assert bool(((x.double() - lo.double()) <= 0.1).all()) and bool(((hi.double() - x.double()) <= 0.1).all())
    # at most one float inward of the nearest rounding
    assert bool(((lo == naive) | (lo == above(naive))).all())
    assert bool(((hi == x + 0.1) | (hi == below(x + 0.1))).all())


def test_linf_box_with_zero_eps_is_the_point():
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    lo, hi = linf_box(x, 0.0)
    assert torch.equal(lo, x) and torch.equal(hi, x)


# ---------------------------------------------------------------------------- project

def test_project_linf_clamps_to_the_ball_and_the_box():
    x = torch.tensor([[0.5, 0.5, 0.95, 0.05, 0.5]])
    x_adv = torch.tensor([[0.9, 0.3, 1.2, -0.3, 0.55]])
    out = project(x_adv, x, 0.25, "inf")
    assert out[0].tolist() == pytest.approx([0.75, 0.3, 1.0, 0.0, 0.55])
    assert bool(((out.double() - x.double()).abs() <= 0.25).all())
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("eps,norm", [(None, "inf"), (0.1, None), (None, None), (None, "2")])
def test_project_without_a_ball_is_the_box(eps, norm):
    x = torch.tensor([[0.5, 0.5, 0.5]])
    x_adv = torch.tensor([[1.7, -0.2, 0.9]])
    assert project(x_adv, x, eps, norm)[0].tolist() == pytest.approx([1.0, 0.0, 0.9])


def test_project_l2_rescales_onto_the_sphere():
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    d = torch.tensor([0.3, -0.4, 0.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2)  # norm 0.5
    out = project(x + d, x, 0.25, "2")
    margin = 2 * torch.finfo(torch.float64).eps   # sqrt(4) * eps_machine
    expect = 0.25 * (1 - 1e-6) - margin
    assert float((out - x).flatten(1).norm(dim=1)) == pytest.approx(expect, rel=0, abs=1e-12)
    # the direction is kept
    assert torch.allclose((out - x).flatten(), d.flatten() * expect / 0.5, rtol=0, atol=1e-12)
    assert out.shape == x.shape and out.dtype == torch.float64


def test_project_l2_keeps_a_point_inside_the_ball_and_clamps_to_the_box():
    x = torch.tensor([[0.5, 0.5, 0.95]])
    x_adv = torch.tensor([[0.6, 0.4, 0.95]])  # norm 0.1414 < 0.5
    assert torch.equal(project(x_adv, x, 0.5, "2"), x_adv)
    x_adv2 = torch.tensor([[0.5, 0.5, 1.05]])  # norm 0.1 inside, but out of the box
    assert project(x_adv2, x, 0.5, "2")[0].tolist() == pytest.approx([0.5, 0.5, 1.0])
    x_adv3 = torch.tensor([[0.5, 0.5, -0.05]])
    assert project(x_adv3, torch.tensor([[0.5, 0.5, 0.02]]), 0.5, "2")[0].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_project_l2_each_sample_on_its_own():
    x = torch.full((3, 4), 0.5, dtype=torch.float64)
    d = torch.tensor([[0.1, 0, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    out = project(x + d, x, 0.2, "2")
    n = (out - x).norm(dim=1)
    assert n[0] == pytest.approx(0.1, abs=1e-12)           # inside: unchanged
    assert n[1] == pytest.approx(0.2 * (1 - 1e-6), abs=1e-12)
    assert n[2] == 0.0


def test_project_l2_with_zero_eps_or_zero_perturbation_is_x():
    x = torch.full((1, 4), 0.5)
    assert torch.equal(project(x.clone(), x, 0.0, "2"), x)
    assert torch.equal(project(x + 0.1, x, 0.0, "2"), x)
    assert torch.equal(project(x.clone(), x, 0.3, "2"), x)


def test_project_l2_holds_the_ball_in_float32_on_a_large_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 28, 28, generator=g)
    x_adv = x + torch.randn(1, 1, 28, 28, generator=g)
    for eps in (0.1, 0.5, 1.0):
        out = project(x_adv, x, eps, "2")
        n = float((out.double() - x.double()).flatten(1).norm(dim=1))
        assert n <= eps
        # clamping to the box can only shrink it; before the box it was eps minus the margins
        pre = float((x_adv - x).flatten(1).norm())
        assert pre > eps


def test_project_l2_inside_the_margin_on_a_large_image():
    # no clamping here (x in the middle, small perturbation): the realised norm is eps minus the
    # relative 1e-6 and the rounding margin sqrt(D) * eps_machine, within float rounding
    x = torch.full((1, 1, 28, 28), 0.5)
    d = torch.zeros(1, 1, 28, 28)
    d.view(-1)[:100] = 0.01
    d.view(-1)[100:200] = -0.01   # norm 0.1414
    out = project(x + d, x, 0.1, "2")
    n = float((out.double() - x.double()).flatten(1).norm(dim=1))
    margin = 28 * torch.finfo(torch.float32).eps
    assert n <= 0.1 * (1 - 1e-6) - margin / 2
    assert n >= 0.1 * (1 - 1e-6) - 2 * margin


def test_project_rejects_an_unknown_norm():
    x = torch.zeros(1, 2)
    with pytest.raises(AdvlabError, match=r"^norm must be 'inf' or '2', got '1'$"):
        project(x, x, 0.1, "1")


# ---------------------------------------------------------------------------- check_norm

@pytest.mark.parametrize("name,want", [("inf", "inf"), ("Linf", "inf"), ("linf", "inf"), ("LINF", "inf"), ("INF", "inf"),
                                       ("2", "2"), ("L2", "2"), ("l2", "2"), (2, "2")])
def test_check_norm_accepts_the_usual_names(name, want):
    assert check_norm(name) == want


@pytest.mark.parametrize("name,shown", [("L1", "'1'"), ("1", "'1'"), ("fro", "'fro'"), ("L0", "'0'"), (None, "'none'")])
def test_check_norm_names_the_bad_value(name, shown):
    with pytest.raises(AdvlabError, match=rf"^norm must be 'inf' or '2', got {shown}$"):
        check_norm(name)
