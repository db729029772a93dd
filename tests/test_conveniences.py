"""A user's first hour: numpy in and out, eps sweeps, dict/tuple DataLoaders, models that
misbehave (NaN, wrong output shape, another dtype, training mode with BatchNorm), the CLI sweep."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks import PGD, DeepFool, build_attack
from advlab.streaming import own_batches
from advlab.eval import SweepResult, eps_sweep, evaluate
from advlab.train import predict

from helpers import images, labels, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_model():
    """A small CNN fitted for two epochs on the embedded digits (about a second), and 48 test images."""
    from advlab.data import load_dataset
    from advlab.models import build_model
    from advlab.train import fit

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = build_model("model-e", 10, (1, 8, 8), seed=0)
    fit(model, train, epochs=2, lr=3e-3, batch_size=64, seed=0, progress=False)
    return model.eval(), test.images[:48], test.labels[:48]


def _no_grad(model):
    return all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- numpy in and out

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_numpy_round_trip_keeps_dtype_shape_and_ball(digits_model, dtype, norm):
    model, x, y = digits_model
    xn, yn = x.numpy().astype(dtype), y.numpy().astype(np.int32)  # int32: Windows numpy's default
    eps = 0.1 if norm == "inf" else 0.5
    xa = PGD(model, eps=eps, norm=norm, steps=4, seed=0)(xn, yn)
    assert isinstance(xa, np.ndarray) and xa.dtype == dtype and xa.shape == xn.shape
    assert xa.min() >= 0 and xa.max() <= 1
    d = (xa.astype(np.float64) - xn.astype(np.float64)).reshape(len(xn), -1)
    size = np.abs(d).max(1) if norm == "inf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps and size.max() > 0.5 * eps
    assert not np.shares_memory(xa, xn)
    if dtype == np.float32:  # the same numbers as the tensor path
        ref = PGD(model, eps=eps, norm=norm, steps=4, seed=0)(x, y)
        assert torch.equal(torch.from_numpy(xa), ref)
    assert _no_grad(model)


def test_numpy_targets_run_and_clear_errors_for_other_types(digits_model):
    model, x, y = digits_model
    xn, yn = x.numpy(), y.numpy()
    target = ((y + 1) % 10).numpy()
    xa = PGD(model, eps=0.3, steps=5, seed=0)(xn, yn, target=target)
    assert isinstance(xa, np.ndarray)
    res = PGD(model, eps=0.1, steps=3, seed=0).run((xn, yn), batch_size=16, targets=target)
    assert len(res) == len(y) and res.targets.dtype == torch.int64
    with pytest.raises(AdvlabError, match="x must be a torch.Tensor or a numpy array"):
        PGD(model, eps=0.1)(xn.tolist(), yn)
    with pytest.raises(AdvlabError, match="y must be a torch.Tensor or a numpy array"):
        PGD(model, eps=0.1)(xn, yn.tolist())
    with pytest.raises(AdvlabError, match="floating-point"):
        PGD(model, eps=0.1)((xn * 255).astype(np.uint8), yn)


def test_evaluate_takes_numpy_and_returns_numpy(digits_model):
    model, x, y = digits_model
    xn = x[:16].numpy().astype(np.float64)
    res = evaluate(model, xn, y[:16].numpy(), eps=0.1, steps=3, attacks=("APGD-CE",), checks=False)
    assert isinstance(res.x_adv, np.ndarray) and res.x_adv.dtype == np.float64 and res.x_adv.shape == xn.shape
    assert np.abs(res.x_adv - xn).max() <= 0.1 and 0 <= res.x_adv.min() and res.x_adv.max() <= 1
    broken = [s == "broken" for s in res.status]
    assert any(broken) and np.abs(res.x_adv - xn)[np.array(broken)].max() > 0
    tensor = evaluate(model, x[:16], y[:16], eps=0.1, steps=3, attacks=("APGD-CE",), checks=False)
    assert isinstance(tensor.x_adv, torch.Tensor) and tensor.robust_accuracy == res.robust_accuracy


@pytest.mark.parametrize("model_dtype,x_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_model_and_images_of_different_float_dtypes(model_dtype, x_dtype):
    model = tiny_model(dtype=model_dtype)
    x, y = images(12, dtype=x_dtype), labels(12)
    xa = PGD(model, eps=0.05, steps=3, seed=0)(x, y)
    assert xa.dtype == x_dtype and (xa - x).abs().max() <= 0.05 and (xa != x).any()
    res = PGD(model, eps=0.05, steps=3, seed=0).run((x, y), batch_size=8)
    # the clean predictions are the model's own, in its dtype (measured accuracy: 0/12 and 3/12)
    clean = predict(model, x.to(model_dtype))
    assert len(res) == 12 and torch.equal(res.clean_pred, clean)
    assert res.clean_accuracy == pytest.approx(float((clean == y).float().mean()))
    assert DeepFool(model, steps=5)(x, y).dtype == x_dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_on_cuda_numpy_and_cpu_data_come_back_on_the_cpu():
    model = tiny_model().cuda()
    x, y = images(8), labels(8)
    xa = PGD(model, eps=0.1, steps=3, seed=0)(x, y)
    assert xa.device.type == "cpu" and (xa - x).abs().max() <= 0.1
    xn = PGD(model, eps=0.1, steps=3, seed=0)(x.numpy().astype(np.float64), y.numpy())
    assert isinstance(xn, np.ndarray) and xn.dtype == np.float64


# ----------------------------------------------------------------------------- eps sweeps

def test_sweep_of_a_fixed_budget_attack_equals_direct_runs(digits_model):
    model, x, y = digits_model
    sw = eps_sweep("pgd", model, x, y, epsilons=[0.2, 0.05, 0.1, 0.1], seed=0, steps=4, batch_size=16)
    assert isinstance(sw, SweepResult) and sw.epsilons == [0.05, 0.1, 0.2] and sw.method == "per-eps"
    assert sw.norm == "inf" and sw.n == len(y)
    for e, acc, asr in zip(sw.epsilons, sw.robust_accuracy, sw.success_rate):
        ref = build_attack("pgd", model, eps=e, seed=0, steps=4).run((x, y), batch_size=16)
        assert acc == ref.robust_accuracy and asr == ref.success_rate
    one = eps_sweep("pgd", model, x.numpy(), y.numpy(), epsilons=[0.1], seed=0, steps=4, batch_size=16)
    assert one.robust_accuracy == [sw.robust_accuracy[1]]
    assert sw.robust_accuracy[-1] < sw.clean_accuracy
    zero = eps_sweep(PGD, model, x, y, epsilons=[0, 0.1], seed=0, steps=4, batch_size=16)  # a class works too
    assert zero.robust_accuracy == [sw.clean_accuracy, sw.robust_accuracy[1]] and zero.success_rate[0] == 0
    rows = sw.rows()
    assert [r["eps"] for r in rows] == sw.epsilons and rows[0]["norm"] == "L-inf"
    d = json.loads(json.dumps(sw.to_dict()))
    assert d["robust_accuracy"] == sw.robust_accuracy and d["method"] == "per-eps" and d["params"] == {"steps": 4}
    import matplotlib.pyplot as plt

    fig = sw.figure()
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == sw.epsilons
    plt.close(fig)


def test_sweep_of_a_minimum_norm_attack_thresholds_one_run(digits_model):
    model, x, y = digits_model
    grid = [0, 0.1, 0.25, 0.5, 1.0, 4.0]
    sw = eps_sweep("deepfool", model, x, y, epsilons=grid, steps=20)
    assert sw.method == "threshold" and sw.norm == "2" and len(sw.results) == 1
    acc = sw.robust_accuracy
    assert all(a >= b for a, b in zip(acc, acc[1:])) and acc[0] == sw.clean_accuracy
    assert all(a <= b for a, b in zip(sw.success_rate, sw.success_rate[1:]))
    assert acc[-1] < 0.2 < acc[0]  # DeepFool breaks nearly every image within L2 4
    ref = DeepFool(model, steps=20).run((x, y))
    for e, a in zip(grid, acc):
        broken = ref.counted & (ref.l2 <= e) & (ref.adv_pred != ref.labels)
        assert a == pytest.approx(float((ref.counted & ~broken).double().mean()))
    linf = eps_sweep(DeepFool(model, steps=20), model, x, y, epsilons=[0.05, 0.2], threshold_norm="linf")
    assert linf.norm == "inf" and linf.label == "DeepFool (L-inf, thresholded)"
    jsma = eps_sweep("jsma", model, x[:16], y[:16], epsilons=[0, 2, 8])
    assert jsma.norm == "0" and jsma.robust_accuracy[0] >= jsma.robust_accuracy[-1]


def test_sweep_counts_a_rejection_as_detected_never_as_success(digits_model):
    model, x, y = digits_model

    def judge(xb):  # a detector: digits pixels are multiples of 1/16, perturbed ones are not
        off = ((xb * 16 - (xb * 16).round()).abs() > 1e-4).flatten(1).any(1)
        return torch.where(off.cpu(), torch.full((xb.shape[0],), REJECT), model(xb).argmax(1).cpu())
    for name, grid in (("fgsm", [0.05, 0.2]), ("deepfool", [0.5, 4.0])):
        kw = {} if name == "fgsm" else {"steps": 20}
        sw = eps_sweep(name, model, x, y, epsilons=grid, predict_fn=judge, **kw)
        assert sw.success_rate == [0.0, 0.0] and sw.detected[-1] > 0.5, name
        assert sw.robust_accuracy[-1] < sw.clean_accuracy


@pytest.mark.parametrize("bad,needle", [([], "empty"), ([0.1, -0.1], ">= 0"), ([float("nan")], "finite"),
                                        ([0.1, float("inf")], "finite"), (["0.1"], "numbers"),
                                        ("0.1", "list of numbers"), (None, "list of numbers")])
def test_sweep_checks_epsilons(digits_model, bad, needle):
    model, x, y = digits_model
    with pytest.raises(AdvlabError, match=needle):
        eps_sweep("pgd", model, x, y, epsilons=bad)


def test_sweep_argument_errors(digits_model):
    model, x, y = digits_model
    with pytest.raises(AdvlabError, match="epsilons="):
        eps_sweep("pgd", model, x, y, epsilons=[0.1], eps=0.1)
    with pytest.raises(AdvlabError, match="minimum-norm attacks"):
        eps_sweep("pgd", model, x, y, epsilons=[0.1], threshold_norm="2")
    with pytest.raises(AdvlabError, match="unknown attack 'pgdd'"):
        eps_sweep("pgdd", model, x, y, epsilons=[0.1])
    with pytest.raises(AdvlabError, match="does not take 'alpha'"):
        eps_sweep("deepfool", model, x, y, epsilons=[0.1], alpha=0.1)
    with pytest.raises(AdvlabError, match="threshold_norm must be"):
        eps_sweep("deepfool", model, x, y, epsilons=[0.1], threshold_norm="1")


# ----------------------------------------------------------------------------- data inputs of run

class _DictSet(torch.utils.data.Dataset):
    def __init__(self, x, y, xkey="image", ykey="label"):
        self.x, self.y, self.xkey, self.ykey = x, y, xkey, ykey

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.xkey: self.x[i], self.ykey: self.y[i], "id": i}


def _same(a, b):
    for k in ("labels", "clean_pred", "adv_pred", "success", "detected", "l0", "l2", "linf"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_dataloaders_of_tuples_dicts_and_numpy_give_the_tensor_result(digits_model):
    model, x, y = digits_model
    atk = PGD(model, eps=0.1, steps=3, seed=0)
    ref = atk.run((x, y), batch_size=16)
    DL = torch.utils.data.DataLoader
    inputs = {
        "tuple loader": DL(torch.utils.data.TensorDataset(x, y), batch_size=16),
        "dict loader": DL(_DictSet(x, y), batch_size=16),
        "hf-style keys": DL(_DictSet(x, y, "pixel_values", "labels"), batch_size=16),
        "dict dataset": _DictSet(x, y, "x", "y"),
        "numpy pair": (x.numpy(), y.numpy()),
        "list pair": [x, y],
        "dict of arrays": {"images": x.numpy(), "target": y.numpy()},
        "numpy batches": [(x[i:i + 16].numpy(), y[i:i + 16].numpy()) for i in range(0, len(y), 16)],
        "list batches": [[x[i:i + 16], y[i:i + 16]] for i in range(0, len(y), 16)],
        "dict batches": ({"input": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, len(y), 16)),
    }
    for name, data in inputs.items():
        atk.reset()
        _same(atk.run(data, batch_size=16), ref)
    atk.reset()
    kept = atk.run(DL(_DictSet(x, y), batch_size=16), batch_size=16, keep_adversarials=True)
    assert torch.equal(kept.adversarials, PGD(model, eps=0.1, steps=3, seed=0).run((x, y), batch_size=16,
                                                                                    keep_adversarials=True).adversarials)


def test_sharded_batches_of_dict_loaders_match_the_single_process_stream(digits_model):
    _, x, y = digits_model
    for data in (torch.utils.data.DataLoader(_DictSet(x, y), batch_size=10), _DictSet(x, y),
                 (x.numpy(), y.numpy())):
        from advlab.streaming import as_data

        data = as_data(data)
        one = [(b, o, xb, yb) for b, o, xb, yb in own_batches(data, 10, 1, 0)]
        got = {}
        for rank in range(2):
            for b, o, xb, yb in own_batches(data, 10, 2, rank):
                if xb is not None:
                    assert b % 2 == rank and b not in got
                    got[b] = (o, xb, yb)
        assert sorted(got) == [b for b, *_ in one]
        for b, o, xb, yb in one:
            assert got[b][0] == o and torch.equal(got[b][1], xb) and torch.equal(got[b][2], yb)


def test_bad_batches_get_clear_errors(digits_model):
    model, x, y = digits_model
    atk = PGD(model, eps=0.1, steps=1)
    with pytest.raises(AdvlabError, match=r"keys \['id', 'img', 'lbl'\].*image key"):
        atk.run([{"img": x, "lbl": y, "id": 0}])
    with pytest.raises(AdvlabError, match="a tuple of 3 items"):
        atk.run([(x, y, y)])
    with pytest.raises(AdvlabError, match="got Tensor"):
        atk.run(x)  # forgot the labels
    with pytest.raises(AdvlabError, match="got int"):
        atk.run(3)


# ----------------------------------------------------------------------------- models that misbehave

class _NaNModel(nn.Module):
    """Finite logits while every pixel stays below 0.6, NaN on images that go above it."""

    def __init__(self, inner, always=False):
        super().__init__()
        self.inner, self.always = inner, always

    def forward(self, x):
        out = self.inner(x)
        if self.always:
            return out * float("nan")
        return out + torch.log(0.6 - x.flatten(1).amax(1))[:, None]


def test_nan_model_output_is_a_clear_error(digits_model):
    model, x, y = digits_model
    with pytest.raises(AdvlabError, match="model output contains NaN"):
        PGD(_NaNModel(model, always=True), eps=0.1, steps=2)(x, y)
    with pytest.raises(AdvlabError, match="model output contains NaN"):
        PGD(_NaNModel(model, always=True), eps=0.1, steps=2).run((x, y))
    with pytest.raises(AdvlabError, match="model output contains NaN"):
        evaluate(_NaNModel(model, always=True), x, y, eps=0.1, steps=2, checks=False)
    half = x * 0.5  # clean images are fine; the attack's random start leaves the safe region
    PGD(_NaNModel(model), eps=0.01, steps=2, random_start=False)(half, y)
    # L2 steps divide by the NaN gradient's norm: NaN pixels, caught when perturb returns
    with pytest.raises(AdvlabError, match="model output contains NaN or infinite values during the attack"):
        PGD(_NaNModel(model), eps=1.0, norm="2", steps=2, seed=0)(half, y)
    # sign(NaN) = 0: L-inf PGD stays at its random start; run's judge sees the NaN output
    with pytest.raises(AdvlabError, match="model output contains NaN or infinite values on the attack's images"):
        PGD(_NaNModel(model), eps=0.3, steps=2, seed=0).run((half, y))
    with pytest.raises(AdvlabError, match="model output contains NaN"):
        evaluate(_NaNModel(model), half, y, eps=0.3, steps=2, attacks=("APGD-CE",), checks=False)
    assert _no_grad(model)


class _Shaped(nn.Module):
    def __init__(self, inner, how):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x):
        out = self.inner(x)
        return {"4d": lambda: out[:, :, None, None], "tuple": lambda: (out, out), "1d": lambda: out[:, 0]}[self.how]()


@pytest.mark.parametrize("how,needle", [("4d", r"shape \(N, num_classes\).*got shape \(1, 10, 1, 1\)"),
                                        ("1d", r"got shape \(1,\)"), ("tuple", "tensor of logits")])
def test_model_output_that_is_not_2d_is_a_clear_error(digits_model, how, needle):
    model, x, y = digits_model
    with pytest.raises(AdvlabError, match=needle):
        PGD(_Shaped(model, how), eps=0.1, steps=1)(x, y)
    with pytest.raises(AdvlabError, match=needle):
        evaluate(_Shaped(model, how), x, y, eps=0.1, steps=1, checks=False)


def test_batchnorm_model_in_training_mode_is_left_untouched():
    model = tiny_model().train()
    bn = model[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = images(16), labels(16)
    PGD(model, eps=0.1, steps=3, seed=0)(x.numpy(), y.numpy())
    PGD(model, eps=0.1, steps=3, seed=0).run((x, y), batch_size=8)
    DeepFool(model, steps=3)(x, y)
    eps_sweep("fgsm", model, x, y, epsilons=[0, 0.1])
    evaluate(model, x, y, eps=0.1, steps=2, attacks=("APGD-CE",), checks=False)
    assert model.training and bn.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm running stats changed"
    # the attacked model was in eval mode: the same adversarial as from the model in eval mode
    a = PGD(model, eps=0.1, steps=3, seed=0)(x, y)
    b = PGD(tiny_model().eval(), eps=0.1, steps=3, seed=0)(x, y)
    assert torch.equal(a, b) and model.training


# ----------------------------------------------------------------------------- the CLI sweep

def test_cli_attack_with_a_list_of_eps_writes_a_sweep(digits_model, tmp_path, capsys):
    from advlab.cli import main
    from advlab.train import save_checkpoint

    model, _, _ = digits_model
    ckpt = save_checkpoint(model, tmp_path / "m.pt", dataset="digits")
    out = tmp_path / "sweep"
    assert main(["attack", "--checkpoint", str(ckpt), "--dataset", "digits", "--attack", "pgd,deepfool",
                 "--eps", "0.05,0.1,0.3", "--steps", "4", "--n", "40", "--seed", "0", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| pgd | L-inf | 0.05 |" in printed and "| deepfool | L2 | 0.3 |" in printed
    for f in ("results.json", "report.md", "accuracy-vs-eps.png", "accuracy-vs-eps.csv"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    sweep = res["results"]["sweep"]
    assert sweep["pgd"]["epsilons"] == [0.05, 0.1, 0.3] and res["spec"]["eps"] == [0.05, 0.1, 0.3]
    assert set(sweep) == {"pgd", "deepfool"} and sweep["deepfool"]["method"] == "threshold"
    acc = sweep["deepfool"]["robust_accuracy"]
    assert all(a >= b for a, b in zip(acc, acc[1:])) and not any(math.isnan(a) for a in acc)
    # one eps: today's single attack report
    single = tmp_path / "single"
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "pgd", "--eps", "0.1", "--steps", "2", "--n", "20",
                 "--out", str(single), "--quiet"]) == 0
    assert (single / "attack-results.csv").is_file() and not (single / "accuracy-vs-eps.png").exists()
    capsys.readouterr()
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "pgd", "--eps", "0.1,-0.2", "--n", "20",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "--eps must be finite and >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["attack", "--checkpoint", str(ckpt), "--attack", "pgd", "--eps", "0.1,abc"])
    assert exit_.value.code == 2 and "argument --eps: invalid eps '0.1,abc'" in capsys.readouterr().err
