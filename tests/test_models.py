import pytest
import torch

from advlab._util import AdvlabError
from advlab.models import MODELS, build_model, count_parameters, list_models, model_info
from advlab.nn import Normalize, find_module, last_linear_name, taps


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_runs_on_its_natural_shape_and_8x8(name):
    shape = model_info(name)[0]
    for in_shape in (shape, (1, 8, 8)):
        m = build_model(name, num_classes=7, in_shape=in_shape).eval()
        out = m(torch.rand(3, *in_shape))
        assert out.shape == (3, 7)
        assert torch.isfinite(out).all()
        assert count_parameters(m) > 1000
        assert isinstance(m[0] if isinstance(m, torch.nn.Sequential) else m.normalize, Normalize)
        # the head and hidden layers the defenses tap exist
        find_module(m, m.head_name)
        for layer in m.hidden_layers:
            find_module(m, layer)


def test_list_models_and_unknown_name():
    assert {"mnist-fc1", "lenet5", "cnn6", "model-e", "model-f", "resnet", "mobilenetv2"} <= set(list_models())
    with pytest.raises(AdvlabError, match="unknown model 'lenet6'.*lenet5"):
        build_model("lenet6")
    with pytest.raises(AdvlabError, match="in_shape"):
        build_model("lenet5", 10, (28, 28))
    with pytest.raises(AdvlabError, match="depth"):
        build_model("resnet", 10, depth=21)


def test_paper_architectures():
    fc1 = build_model("mnist-fc1")
    linears = [m for m in fc1.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and linears[-1].in_features == 100  # MNIST-FC1: 4 FC, penultimate 100
    e = build_model("model-e")
    assert [l.out_features for l in e.modules() if isinstance(l, torch.nn.Linear)] == [200, 200, 10]
    f = build_model("model-f")
    convs = [m for m in f.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(64, (8, 8), (2, 2)), (128, (6, 6), (2, 2))]
    c6 = build_model("cnn6")
    convs = [m for m in c6.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and all(c.kernel_size == (5, 5) for c in convs)
    assert sum(isinstance(m, torch.nn.PReLU) for m in c6.modules()) == 8
    assert c6.feature_layers == ("gap", "act_fc1", "act_fc2")
    r110 = build_model("resnet", 10, depth=110)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in r110.modules()) == 109


def test_taps_capture_named_activations_and_remove_hooks():
    m = build_model("cnn6").eval()
    x = torch.rand(2, 1, 28, 28)
    with taps(m, list(m.feature_layers)) as feats:
        m(x)
    assert feats["gap"].shape == (2, 128) and feats["act_fc1"].shape == (2, 512) and feats["act_fc2"].shape == (2, 64)
    # gradients flow through taps
    feats["act_fc2"].sum().backward()
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    with taps(m, ["head"], inputs=True) as f2:
        m(x)
    assert torch.allclose(f2["head"], feats["act_fc2"].detach())
    assert last_linear_name(m) == "head"
    with pytest.raises(AdvlabError, match="no layer named 'nope'"):
        with taps(m, ["nope"]):
            pass


def test_larger_model_f():
    """model-f-deep2 (the I-defender Table 8 analogue's second architecture) and F's width option."""
    f = build_model("model-f", 10, (1, 28, 28), seed=0)
    deep = build_model("model-f-deep2", 10, (1, 28, 28), seed=0)
    wide = build_model("model-f", 10, (1, 28, 28), seed=0, width=2)
    assert (count_parameters(f), count_parameters(deep), count_parameters(wide)) == (310_730, 605_898, 1_211_274)
    for m in (deep, wide):
        assert m.hidden_layers == ("flatten",) and m.advlab_spec["in_shape"] == [1, 28, 28]
        assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with taps(deep, ["flatten"]) as feats:
        deep(torch.rand(2, 1, 28, 28))
    assert feats["flatten"].shape == (2, 1152)                  # F's hidden-state size
    again = build_model("model-f-deep2", 10, (1, 28, 28), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(deep.state_dict().values(), again.state_dict().values()))
    # F's own layers draw the same initial weights with or without the extra convolutions
    assert torch.equal(deep.conv2.weight, f.conv2.weight) and not torch.equal(deep.head.bias, f.head.bias)
    m = build_model("model-f", 10, (1, 8, 8), seed=0, width=1.5, extra_convs=1)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10) and m.conv3.weight.shape == (192, 192, 3, 3)


def test_taps_work_on_resnet_feature_points_and_user_models():
    r = build_model("resnet", 10, depth=20).eval()
    with taps(r, list(r.feature_layers)) as feats:
        r(torch.rand(2, 3, 32, 32))
    assert feats["layer1_gap"].shape == (2, 16) and feats["layer2_gap"].shape == (2, 32) and feats["gap"].shape == (2, 64)
    user = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with taps(user, ["2"]) as f:
        user(torch.rand(5, 1, 2, 2))
    assert f["2"].shape == (5, 3) and (f["2"] >= 0).all()
    assert last_linear_name(user) == "3"


def test_normalize():
    n = Normalize([0.5, 0.25], [0.5, 0.25])
    x = torch.ones(1, 2, 2, 2)
    assert torch.allclose(n(x)[0, 0], torch.ones(2, 2)) and torch.allclose(n(x)[0, 1], 3 * torch.ones(2, 2))
    with pytest.raises(AdvlabError, match=r"^std must be > 0"):
        Normalize(0.0, 0.0)
