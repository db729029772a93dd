import pytest
import torch

from advlab._util import AdvlabError
from advlab.models import build_model
from advlab.train import accuracy, fit, load_checkpoint, predict, read_checkpoint, save_checkpoint


def test_fit_learns_digits_and_is_deterministic(digits_data):
    train, test = digits_data
    accs, losses = [], []
    for _ in range(2):
        m = build_model("mnist-fc1", 10, (1, 8, 8), seed=3)
        h = fit(m, train, epochs=4, lr=3e-3, batch_size=64, seed=3, eval_dataset=test, progress=False)
        accs.append(h["test_acc"][-1])
        losses.append(h["loss"])
    assert accs[0] == accs[1] and losses[0] == losses[1]
    assert accs[0] > 0.85
    assert len(losses[0]) == 4 and losses[0][-1] < losses[0][0]
    # no gradients left on the trained model (attacks and defenses start from a clean model)
    assert all(p.grad is None for p in m.parameters()) and not m.training


def test_fit_callbacks_custom_loss_and_early_stop(digits_data):
    train, _ = digits_data
    seen = []

    def cb(epoch, metrics, model):
        seen.append(epoch)
        return epoch == 2

    def loss(model, x, y):
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1), logits

    m = build_model("model-e", 10, (1, 8, 8))
    h = fit(m, train, epochs=5, lr=1e-3, loss=loss, callbacks=[cb], progress=False)
    assert seen == [1, 2] and len(h.epochs) == 2
    assert not m.training


def test_fit_rejects_bad_arguments(digits_data):
    m = build_model("model-e", 10, (1, 8, 8))
    with pytest.raises(AdvlabError, match=r"^lr must be"):
        fit(m, digits_data[0], lr=-1)
    with pytest.raises(AdvlabError, match="optimizer"):
        fit(m, digits_data[0], optimizer="rmsprop")
    with pytest.raises(AdvlabError, match="batch_size"):
        fit(m, digits_data[0], batch_size=0)


def test_checkpoint_round_trip_rebuilds_model(tmp_path, lenet_digits, digits_data):
    path = save_checkpoint(lenet_digits, tmp_path / "sub" / "m.pt", dataset="digits", test_accuracy=0.97)
    model, meta = load_checkpoint(path)
    assert meta["model"]["name"] == "lenet5" and meta["dataset"] == "digits"
    assert "advlab_version" in meta and "torch_version" in meta
    x = digits_data[1].images[:16]
    assert torch.equal(predict(model, x), predict(lenet_digits, x))
    assert accuracy(model, digits_data[1]) == accuracy(lenet_digits, digits_data[1])
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))  # atomic write leaves no temp file


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path, lenet_digits):
    good = save_checkpoint(lenet_digits, tmp_path / "m.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdvlabError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(AdvlabError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(AdvlabError, match=r"checkpoint not found: .*missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(AdvlabError, match="not an advlab checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(AdvlabError, match="does not fit"):
        load_checkpoint(good, model=build_model("model-e", 10, (1, 8, 8)))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "metadata": {}, "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(AdvlabError, match=r"evil\.pt is a plain pickle"):
        load_checkpoint(tmp_path / "evil.pt")


def test_lenet_on_mnist10k_three_epochs(mnist_data):
    """The foundation issue's bar: LeNet-5 >= 97% after 3 epochs (CLI defaults: adam 3e-3, batch 32, onecycle)."""
    train, test = mnist_data
    mean, std = train.channel_stats()
    m = build_model("lenet5", 10, (1, 28, 28), mean=mean, std=std, seed=0)
    fit(m, train, epochs=3, lr=3e-3, batch_size=32, schedule="onecycle", seed=0, progress=False)
    assert accuracy(m, test) >= 0.97
