"""The one attack loop (advlab.attacks.loop) on hand-made objectives: the active set, each step
rule and projection against its formula, logit_grads' three paths, and the loop's order of hooks,
early leaving and write-back (sharp enough for mutation testing, benchmarks/mutation.py)."""

import pytest
import torch

from advlab._util import AdvlabError
from advlab.attacks.loop import (ACCELERATOR_CHECK_EVERY, ActiveSet, AdamStep, AttackLoop, BoxProjection, L2Projection,
                                 L2Step, LinfProjection, SignStep, autograd, ball_projection, check_interval, detach,
                                 logit_grads, per_sample, step_rule)

D = torch.float64


def test_per_sample_reshapes_to_broadcast():
    v = torch.tensor([1.0, 2.0])
    assert per_sample(v, torch.zeros(2, 3, 4, 5)).shape == (2, 1, 1, 1)
    assert per_sample(v, torch.zeros(2, 3)).shape == (2, 1)
    assert per_sample(v, torch.zeros(2)).shape == (2,)


# ---------------------------------------------------------------------------- ActiveSet

def test_active_set_keeps_rows_aligned_and_writes_back():
    v = torch.arange(5.0)[:, None]
    s = ActiveSet(5, "cpu", outputs=("v",), v=v.clone(), lab=torch.arange(5), scalar=torch.tensor(3.0), none=None,
                  ref=[10, 11, 12, 13, 14], slicers={"ref": lambda r, k: [r[i] for i in k.tolist()]})
    assert len(s) == 5 and s.n == 5 and s.idx.tolist() == [0, 1, 2, 3, 4]
    assert "lab" in s and "nothing" not in s and s.get("nothing", 7) == 7 and s.get("lab") is not None
    s.v += 100
    assert s.keep(torch.tensor([True, False, True, False, True]))
    assert s.idx.tolist() == [0, 2, 4] and len(s) == 3 and s.n == 5
    assert s.lab.tolist() == [0, 2, 4] and s.ref == [10, 12, 14] and float(s.scalar) == 3.0 and s.none is None
    # the rows that left were written back with their value at leaving
    assert s.outputs["v"][:, 0].tolist() == [100, 101, 102, 103, 104]
    s.v += 1000
    assert s.keep(torch.tensor([False, True, False]))
    assert s.idx.tolist() == [2] and s.ref == [12]
    s.v += 1
    s.write_back()
    assert s.outputs["v"][:, 0].tolist() == [1100, 101, 1103, 103, 1104]
    assert not s.keep(torch.tensor([False]))
    assert len(s) == 0
    assert s.outputs["v"][:, 0].tolist() == [1100, 101, 1103, 103, 1104]


def test_active_set_outputs_are_copies_and_names_work_like_attributes():
    v = torch.zeros(3)
    s = ActiveSet(3, "cpu", outputs=("v",), v=v)
    s.v.add_(1.0)
    assert s.outputs["v"].tolist() == [0, 0, 0]     # a copy, not the same tensor
    s.w = torch.ones(3)
    assert "w" in s and s.pop("w").tolist() == [1, 1, 1] and "w" not in s
    with pytest.raises(AttributeError):
        s.missing
    s.add_output("w", torch.full((3,), -1.0))
    s.w = torch.tensor([5.0, 6.0, 7.0])
    s.keep(torch.tensor([True, False, True]))
    assert s.outputs["w"].tolist() == [5.0, 6.0, 7.0]
    s.idx = torch.tensor([1, 0])   # idx, outputs, n are attributes of the set, not per-sample tensors
    assert "idx" not in s and s.idx.tolist() == [1, 0]
    s.n = 9
    assert s.n == 9 and "n" not in s
    s.outputs = {}
    assert "outputs" not in s and s.outputs == {}
    s2 = ActiveSet(2, "cpu", outputs=("gone",), gone=torch.zeros(2))
    s2.pop("gone")
    s2.write_back()   # a named output without its per-sample tensor is left alone
    assert s2.outputs["gone"].tolist() == [0, 0]


# ---------------------------------------------------------------------------- gradient functions

def test_autograd_returns_the_gradient_of_the_sum_detached():
    v = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    g, out, obj = autograd(lambda t: (t * 2, (t ** 2).sum(1)), v)
    assert g.tolist() == [[2.0, 4.0], [6.0, -2.0]]
    assert out.tolist() == [[2.0, 4.0], [6.0, -2.0]] and obj.tolist() == [5.0, 10.0]
    assert not out.requires_grad and not obj.requires_grad and not v.requires_grad
    with torch.no_grad():
        g2, _, _ = autograd(lambda t: (t, t.sum(1)), v)
    assert g2.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(AdvlabError, match=r"^the attack needs gradients, but the model's output does not depend "
                                          r"differentiably on its input \(detached or non-differentiable layers\); for "
                                          r"quantizing or clamping defenses use BPDA \(advlab.adaptive.BPDA\) or a "
                                          r"black-box attack \(Square\)$"):
        autograd(lambda t: (t, t.detach().sum(1)), v)


def test_detach_handles_tuples():
    a = torch.ones(2, requires_grad=True) * 2
    out = detach((a, "x", None))
    assert not out[0].requires_grad and out[1] == "x" and out[2] is None and isinstance(out, tuple)
    assert not detach(a).requires_grad


class Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return x.flatten(1) @ self.w.T


class NoVmap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        if bool(g.abs().sum() > -1):   # data-dependent control flow: vmap cannot batch this backward
            return g
        return g


class LinearNoVmap(Linear):
    def forward(self, x):
        return NoVmap.apply(x.flatten(1)) @ self.w.T


@pytest.mark.parametrize("cls", [Linear, LinearNoVmap])
def test_logit_grads_are_the_weighted_input_gradients(cls):
    W = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5]], dtype=D)
    m = cls(W)
    x = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    w = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 2.0], [1.0, -1.0, 0.0]]], dtype=D)  # (K=2, N=2, C)
    logits, g = logit_grads(m, x, w)
    assert torch.allclose(logits, x.flatten(1) @ W.T) and not logits.requires_grad
    assert g.shape == (2, 2, 1, 2, 2)
    for k in range(2):
        assert torch.allclose(g[k].flatten(1), w[k] @ W, rtol=0, atol=1e-12)
    # K = 1, and weights as a function of the logits
    l1, g1 = logit_grads(m, x, lambda z: torch.ones(1, *z.shape, dtype=D))
    assert g1.shape == (1, 2, 1, 2, 2) and torch.allclose(g1[0].flatten(1), W.sum(0).expand(2, 4), rtol=0, atol=1e-12)
    assert not x.requires_grad


# ---------------------------------------------------------------------------- step rules

def test_sign_step_and_momentum():
    s = ActiveSet(2, "cpu", v=torch.zeros(2, 3))
    st = SignStep(alpha=0.5)
    st.init(s)
    assert "momentum" not in s
    st(s, torch.tensor([[1.0, -2.0, 0.0], [-3.0, 4.0, 5.0]]), 1)
    assert s.v.tolist() == [[-0.5, 0.5, 0.0], [0.5, -0.5, -0.5]]
    m = ActiveSet(1, "cpu", v=torch.zeros(1, 2))
    mim = SignStep(alpha=1.0, decay=0.5)
    mim.init(m)
    assert m.momentum.tolist() == [[0.0, 0.0]]
    mim(m, torch.tensor([[3.0, -1.0]]), 1)          # mean |g| = 2: momentum (1.5, -0.5)
    assert m.momentum.tolist() == [[1.5, -0.5]] and m.v.tolist() == [[-1.0, 1.0]]
    mim(m, torch.tensor([[-4.0, 4.0]]), 2)          # 0.5 * (1.5, -0.5) + (-1, 1) = (-0.25, 0.75)
    assert m.momentum.tolist() == [[-0.25, 0.75]] and m.v.tolist() == [[0.0, 0.0]]
    z = ActiveSet(1, "cpu", v=torch.zeros(1, 2))
    mim.init(z)
    mim(z, torch.zeros(1, 2), 1)                    # a zero gradient: no NaN
    assert z.momentum.tolist() == [[0.0, 0.0]] and z.v.tolist() == [[0.0, 0.0]]
    assert SignStep(1).alpha == 1.0 and isinstance(SignStep(1).alpha, float) and SignStep(1).decay is None


def test_l2_step():
    s = ActiveSet(2, "cpu", v=torch.zeros(2, 2))
    st = L2Step(alpha=2.0)
    st.init(s)
    st(s, torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 1)
    assert s.v[0].tolist() == pytest.approx([-1.2, -1.6]) and s.v[1].tolist() == [0.0, 0.0]
    assert L2Step(1).alpha == 1.0 and isinstance(L2Step(1).alpha, float)
    tiny = ActiveSet(1, "cpu", v=torch.zeros(1, 1))
    st(tiny, torch.tensor([[1e-13]]), 1)   # below the 1e-12 floor: the step shrinks with it
    assert float(tiny.v) == pytest.approx(-0.2, rel=1e-5)


def test_adam_step_matches_the_formula():
    lr, b1, b2, eps = 0.1, 0.8, 0.9, 1e-3
    s = ActiveSet(1, "cpu", v=torch.zeros(1, 2, dtype=D))
    st = AdamStep(lr, betas=(b1, b2), eps=eps)
    st.init(s)
    assert s.adam_m.tolist() == [[0.0, 0.0]] and s.adam_v.tolist() == [[0.0, 0.0]]
    m = [0.0, 0.0]
    vv = [0.0, 0.0]
    x = [0.0, 0.0]
    for t, g in enumerate([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]], start=1):
        st(s, torch.tensor([g], dtype=D), t)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            vv[i] = b2 * vv[i] + (1 - b2) * g[i] ** 2
            x[i] -= lr * (m[i] / (1 - b1 ** t)) / ((vv[i] / (1 - b2 ** t)) ** 0.5 + eps)
        assert s.v[0].tolist() == pytest.approx(x, abs=1e-12)
        assert s.adam_m[0].tolist() == pytest.approx(m, abs=1e-12)
        assert s.adam_v[0].tolist() == pytest.approx(vv, abs=1e-12)
    d = AdamStep(0.5)
    assert (d.lr, d.b1, d.b2, d.eps) == (0.5, 0.9, 0.999, 1e-8)


# ---------------------------------------------------------------------------- projections

def test_linf_projection_uses_the_exact_box():
    x = torch.tensor([[0.5, 0.05, 0.95]])
    s = ActiveSet(1, "cpu", x=x, v=torch.tensor([[0.9, -0.5, 0.5]]))
    p = LinfProjection(0.25)
    assert p.eps == 0.25
    p.init(s)
    assert s.lo[0].tolist() == pytest.approx([0.25, 0.0, 0.7]) and s.hi[0].tolist() == pytest.approx([0.75, 0.3, 1.0])
    p(s)
    assert s.v[0].tolist() == pytest.approx([0.75, 0.0, 0.7])


def test_l2_projection():
    x = torch.full((2, 4), 0.5, dtype=D)
    v = x + torch.tensor([[0.3, 0.4, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], dtype=D)
    s = ActiveSet(2, "cpu", x=x, v=v.clone())
    p = L2Projection(0.25)
    p.init(s)
    p(s)
    assert (s.v - x).flatten().tolist() == pytest.approx([0.15, 0.2, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0], abs=1e-12)
    box = ActiveSet(1, "cpu", x=torch.tensor([[0.9, 0.5]], dtype=D), v=torch.tensor([[1.05, 0.5]], dtype=D))
    p(box)
    assert box.v[0].tolist() == pytest.approx([1.0, 0.5])
    lo = ActiveSet(1, "cpu", x=torch.tensor([[0.1, 0.5]], dtype=D), v=torch.tensor([[-0.05, 0.5]], dtype=D))
    p(lo)
    assert lo.v[0].tolist() == pytest.approx([0.0, 0.5])
    same = ActiveSet(1, "cpu", x=torch.tensor([[0.3]], dtype=D), v=torch.tensor([[0.3]], dtype=D))
    p(same)
    assert same.v.tolist() == [[0.3]]


def test_box_projection():
    s = ActiveSet(1, "cpu", x=torch.tensor([[0.2, 0.9]]), v=torch.tensor([[1.5, -0.5]]))
    BoxProjection()(s)
    assert s.v.tolist() == [[1.0, 0.0]]
    d = ActiveSet(1, "cpu", x=torch.tensor([[0.25, 0.75]]), v=torch.tensor([[1.0, -1.0]]))
    BoxProjection(delta=True)(d)
    assert d.v.tolist() == [[0.75, -0.75]]
    d2 = ActiveSet(1, "cpu", x=torch.tensor([[0.25, 0.75]]), v=torch.tensor([[0.5, -0.5]]))
    BoxProjection(delta=True)(d2)
    assert d2.v.tolist() == [[0.5, -0.5]]
    assert BoxProjection().delta is False


def test_ball_projection_and_step_rule_choose_by_norm():
    assert isinstance(ball_projection(None, 0.1), BoxProjection) and isinstance(ball_projection("inf", None), BoxProjection)
    assert not ball_projection(None, None).delta
    p = ball_projection("inf", 0.1)
    assert isinstance(p, LinfProjection) and p.eps == 0.1
    q = ball_projection("2", 0.5)
    assert isinstance(q, L2Projection) and q.eps == 0.5
    with pytest.raises(AdvlabError, match=r"^norm must be 'inf' or '2', got 'l1'$"):
        ball_projection("l1", 0.1)
    s = step_rule("inf", 0.01, 0.9)
    assert isinstance(s, SignStep) and s.alpha == 0.01 and s.decay == 0.9
    assert step_rule("inf", 0.01).decay is None
    l2 = step_rule("2", 0.2)
    assert isinstance(l2, L2Step) and l2.alpha == 0.2


# ---------------------------------------------------------------------------- the loop

class Recorder:
    """A step rule and projection that record the order of calls."""

    def __init__(self, log, alpha=1.0):
        self.log, self.alpha = log, alpha

    def init(self, s):
        self.log.append(("init", type(self).__name__))

    def __call__(self, s, *a):
        if a:
            g, t = a
            self.log.append(("step", t, s.idx.tolist()))
            s.v.sub_(g, alpha=self.alpha)
        else:
            self.log.append(("project", s.idx.tolist()))


def quadratic_loop(log, observe=None, steps=3, **kw):
    # minimise |v - 3|^2 per sample, gradient 2 (v - 3); step v -= 0.25 g: v moves half-way to 3 each step
    x = torch.tensor([[0.0], [1.0], [2.0]])
    s = ActiveSet(3, "cpu", outputs=("v",), v=x.clone(), target=torch.full((3, 1), 3.0))
    loop = AttackLoop(forward=lambda s_, v: v * 1.0, objective=lambda out, s_, v: ((out - s_.target) ** 2).sum(1),
                      step=Recorder(log, 0.25), project=Recorder(log), observe=observe,
                      after_step=lambda s_, t: log.append(("after", t, s_.idx.tolist())), **kw)
    return loop.run(s, steps), loop


def test_loop_runs_hooks_in_order_and_writes_back():
    log = []
    seen = []

    def observe(out, obj, s, t):
        seen.append((t, out[:, 0].tolist(), obj.tolist()))
        return None

    s, loop = quadratic_loop(log, observe)
    assert log == [("init", "Recorder"), ("init", "Recorder"),
                   ("step", 1, [0, 1, 2]), ("project", [0, 1, 2]), ("after", 1, [0, 1, 2]),
                   ("step", 2, [0, 1, 2]), ("project", [0, 1, 2]), ("after", 2, [0, 1, 2]),
                   ("step", 3, [0, 1, 2]), ("project", [0, 1, 2]), ("after", 3, [0, 1, 2])]
    assert [t for t, _, _ in seen] == [1, 2, 3]
    assert seen[0][1] == [0.0, 1.0, 2.0] and seen[0][2] == [9.0, 4.0, 1.0]
    assert seen[1][1] == [1.5, 2.0, 2.5]
    assert s.outputs["v"][:, 0].tolist() == [2.625, 2.75, 2.875]
    assert loop.final_observe is False and loop.check_every == 1


def test_finished_samples_leave_with_the_judged_iterate():
    log = []

    def observe(out, obj, s, t):
        return out[:, 0] >= 2.0   # done once the judged iterate reaches 2

    s, _ = quadratic_loop(log, observe, steps=4)
    # step 1: sample 2 (at 2.0) leaves before stepping; step 2: 1 (at 2.0) leaves; step 3: 0 (at 2.25) leaves
    assert [e for e in log if e[0] == "step"] == [("step", 1, [0, 1]), ("step", 2, [0])]
    assert s.outputs["v"][:, 0].tolist() == [2.25, 2.0, 2.0]


def test_check_every_delays_leaving_but_the_last_step_always_checks():
    log = []
    s, _ = quadratic_loop(log, lambda out, obj, s_, t: out[:, 0] >= 2.0, steps=3, check_every=2)
    assert [e for e in log if e[0] == "step"] == [("step", 1, [0, 1, 2]), ("step", 2, [0])]
    # step 1 not checked: 2 moves on to 2.5; step 2 checks: 1 (2.0) and 2 (2.5) leave; step 3: 0 (2.25) leaves
    assert s.outputs["v"][:, 0].tolist() == [2.25, 2.0, 2.5]
    log2 = []
    s2, _ = quadratic_loop(log2, lambda out, obj, s_, t: out[:, 0] >= 2.5, steps=3, check_every=5)
    assert [e for e in log2 if e[0] == "step"] == [("step", 1, [0, 1, 2]), ("step", 2, [0, 1, 2]), ("step", 3, [0])]
    with pytest.raises(AdvlabError, match="^check_every must be an integer >= 1, got 0$"):
        quadratic_loop([], None, check_every=0)


def test_final_observe_judges_the_last_iterate_without_gradients():
    seen = []

    def observe(out, obj, s, t):
        seen.append((t, torch.is_grad_enabled(), s.idx.tolist(), out[:, 0].tolist()))
        return None

    quadratic_loop([], observe, steps=2, final_observe=True)
    assert [(t, g) for t, g, _, _ in seen] == [(1, True), (2, True), (3, False)]
    assert seen[-1][3] == [2.25, 2.5, 2.75]
    seen.clear()
    quadratic_loop([], observe, steps=2, final_observe=False)
    assert [t for t, _, _, _ in seen] == [1, 2]
    # nobody left: no final judgement
    seen2 = []
    quadratic_loop([], lambda out, obj, s, t: seen2.append(t) or torch.ones(len(s), dtype=torch.bool), steps=2,
                   final_observe=True)
    assert seen2 == [1]


def test_loop_without_projection_or_observer_and_zero_steps():
    x = torch.tensor([[0.0]])
    s = ActiveSet(1, "cpu", outputs=("v",), v=x.clone())
    loop = AttackLoop(forward=lambda s_, v: v, objective=lambda out, s_, v: -out.sum(1), step=L2Step(1.0))
    assert loop.project is None and loop.observe is None and loop.after_step is None and loop.grad is autograd
    loop.run(s, 2)
    assert s.outputs["v"].tolist() == [[2.0]]
    s0 = ActiveSet(1, "cpu", outputs=("v",), v=x.clone())
    seen = []
    AttackLoop(forward=lambda s_, v: v, objective=lambda out, s_, v: -out.sum(1), step=L2Step(1.0),
               observe=lambda o, ob, s_, t: seen.append(t), final_observe=True).run(s0, 0)
    assert seen == [1] and s0.outputs["v"].tolist() == [[0.0]]


def test_a_custom_gradient_function_is_used():
    calls = []

    def grad(fn, v):
        calls.append(v.shape[0])
        out, obj = fn(v)
        return torch.ones_like(v), out, obj

    x = torch.tensor([[0.0], [0.0]])
    s = ActiveSet(2, "cpu", outputs=("v",), v=x.clone())
    AttackLoop(forward=lambda s_, v: v, objective=lambda out, s_, v: out.sum(1), step=SignStep(0.5), grad=grad).run(s, 2)
    assert calls == [2, 2] and s.outputs["v"][:, 0].tolist() == [-1.0, -1.0]


def test_momentum_normalises_each_sample_by_its_own_mean_abs_gradient():
    s = ActiveSet(2, "cpu", v=torch.zeros(2, 2, dtype=D))
    mim = SignStep(alpha=1.0, decay=0.5)
    mim.init(s)
    # mean |g| is 0.25 and 4 (one global mean would be 2.125; a floor of 1 would leave the first row as is)
    mim(s, torch.tensor([[0.25, -0.25], [-2.0, 6.0]], dtype=D), 1)
    assert s.momentum.tolist() == [[1.0, -1.0], [-0.5, 1.5]] and s.v.tolist() == [[-1.0, 1.0], [1.0, -1.0]]
    mim(s, torch.tensor([[0.0, 0.1], [4.0, 0.0]], dtype=D), 2)   # mean |g| 0.05 and 2
    assert s.momentum.tolist() == [[0.5, 1.5], [1.75, 0.75]] and s.v.tolist() == [[-2.0, 0.0], [0.0, -2.0]]


def test_forward_and_objective_get_the_active_set_and_the_variable():
    # forward scales by a per-sample tensor of the set; the objective is a function of v itself
    x = torch.tensor([[1.0], [2.0]])
    s = ActiveSet(2, "cpu", outputs=("v",), v=x.clone(), w=torch.tensor([[1.0], [3.0]]))
    seen = []

    def observe(out, obj, s_, t):
        seen.append((out[:, 0].tolist(), obj.tolist()))

    AttackLoop(forward=lambda s_, v: v * s_.w, objective=lambda out, s_, v: (out * v).sum(1), step=L2Step(0.5),
               observe=observe).run(s, 1)
    # obj = w v^2, gradient 2 w v > 0: one L2 step of 0.5 downwards per sample
    assert seen == [([1.0, 6.0], [1.0, 12.0])]
    assert s.outputs["v"][:, 0].tolist() == [0.5, 1.5]


def test_active_set_index_lives_on_the_given_device_and_a_missing_name_is_named():
    s = ActiveSet(3, "meta")
    assert s.idx.device.type == "meta" and s.idx.shape == (3,)
    with pytest.raises(AttributeError, match="^missing$"):
        s.missing


class Counting(Linear):
    """Linear logits that count the forward calls and the rows they saw."""

    def __init__(self, w, cls=Linear):
        super().__init__(w)
        self.rows, self.cls = [], cls

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.cls.forward(self, x)


@pytest.mark.parametrize("cls", [Linear, LinearNoVmap])
def test_logit_grads_costs_one_forward_unless_vmap_fails_and_stays_quiet(cls):
    import warnings

    W = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5]], dtype=D)
    x = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=D)     # N = 1, K = 3
    w = torch.eye(3, dtype=D)[:, None, :]
    m = Counting(W, cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, g = logit_grads(m, x, w)
    assert caught == []
    assert g.shape == (3, 1, 1, 2, 2) and torch.allclose(g.flatten(2)[:, 0], W, rtol=0, atol=1e-12)
    # vmapped: one forward of the batch; without a batching rule: one more of the K-times replicated batch
    assert m.rows == ([1] if cls is Linear else [1, 3])


def test_final_observe_gets_the_set_and_the_variable_too():
    x = torch.tensor([[1.0], [2.0]])
    s = ActiveSet(2, "cpu", outputs=("v",), v=x.clone(), w=torch.tensor([[1.0], [3.0]]))
    seen = []

    def observe(out, obj, s_, t):
        seen.append((t, out[:, 0].tolist(), obj.tolist()))

    AttackLoop(forward=lambda s_, v: v * s_.w, objective=lambda out, s_, v: (out * v).sum(1), step=L2Step(0.5),
               observe=observe, final_observe=True).run(s, 1)
    assert seen == [(1, [1.0, 6.0], [1.0, 12.0]), (2, [0.5, 4.5], [0.25, 6.75])]


def test_check_interval_every_step_on_the_cpu_every_tenth_elsewhere_unless_given():
    assert ACCELERATOR_CHECK_EVERY == 10
    assert check_interval(None, "cpu") == 1 and check_interval(None, torch.device("cpu")) == 1
    for dev in ("cuda", torch.device("cuda", 1), "mps", "meta"):
        assert check_interval(None, dev) == 10
    assert check_interval(1, "cuda") == 1 and check_interval(7, "cpu") == 7 and check_interval(3.0, "cpu") == 3
    for bad in (0, -2, 2.5):
        with pytest.raises(AdvlabError, match="check_every must be an integer >= 1"):
            check_interval(bad, "cpu")
