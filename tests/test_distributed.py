"""Past one process: torchrun with 2 CPU processes (gloo, localhost) trains with DDP and runs
sharded attacks and the sharded evaluation battery; the gathered results equal the
single-process ones sample by sample. Plus the helpers' single-process behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

from advlab import distributed
from advlab._util import AdvlabError
from advlab.attacks import FGSM, PGD, Square
from advlab.eval import evaluate
from advlab.models import build_model
from advlab.train import _TensorBatches, fit, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


# the settings both sides use: the worker and the single-process reference
N_ATTACK, ATTACK_BATCH = 100, 16      # 7 batches, the last one partial: rank 0 gets 4, rank 1 gets 3
N_TRAIN, TRAIN_BATCH, EPOCHS = 320, 32, 2


def attacks(model):
    return {"pgd": PGD(model, eps=0.1, alpha=0.02, steps=5, seed=3),           # seeded random start
            "pgd-l2": PGD(model, eps=0.8, alpha=0.2, steps=5, norm="2", seed=4),
            "fgsm": FGSM(model, eps=0.1),                                        # deterministic
            "square": Square(model, eps=0.1, queries=30, seed=5)}               # seeded, score-based


def run_all(model, x, y):
    """Every attack's result on (x, y); PGD also on a map-style Dataset and with targets."""
    out = {}
    for name, atk in attacks(model).items():
        out[name] = atk.run((x, y), batch_size=ATTACK_BATCH, keep_adversarials=True, progress=False)
    targets = (y + 1) % 10
    out["pgd-dataset-targeted"] = PGD(model, eps=0.1, alpha=0.02, steps=5, seed=3).run(
        TensorDataset(x, y), batch_size=ATTACK_BATCH, targets=targets, keep_adversarials=True, progress=False)
    return out


def battery(model, x, y):
    return evaluate(model, x, y, eps=0.1, steps=5, square_queries=30, batch_size=ATTACK_BATCH, sweep=[0.05],
                    seed=1, progress=False)


def result_fields(res):
    d = {k: getattr(res, k) for k in ("labels", "clean_pred", "adv_pred", "success", "detected", "l0", "l2", "linf",
                                      "targets", "adversarials")}
    d.update({f"extras.{k}": v for k, v in res.extras.items()})
    return d


def fit_model(x, y, batch_size, bypass=False):
    """``bypass``: a custom loss that calls ``model.forward`` instead of ``model(x)`` (DDP's wrapper
    never runs; fit averages the gradients explicitly)."""
    model = build_model("lenet5", 10, (1, 8, 8), seed=0)

    def loss(m, xb, yb):
        logits = m.forward(xb)
        return torch.nn.functional.cross_entropy(logits, yb), logits
    hist = fit(model, _Tensors(x, y), epochs=EPOCHS, lr=3e-3, batch_size=batch_size, seed=0, progress=False,
               loss=loss if bypass else None)
    return model, hist


class _Tensors:
    """A tensor dataset in the library's layout (``.images``/``.labels``)."""

    def __init__(self, x, y):
        self.images, self.labels = x, y

    def __len__(self):
        return int(self.labels.shape[0])


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_distributed as T
    from advlab import distributed
    from advlab.train import load_checkpoint

    cfg = json.load(open(sys.argv[1]))
    dev = distributed.init()
    assert distributed.is_distributed() and distributed.world_size() == 2
    r = distributed.rank()
    data = torch.load(cfg["data"])
    # (a) DDP training: per-rank batch TRAIN_BATCH / 2, so the ranks' batches together are the
    # single process's batches of TRAIN_BATCH
    model, hist = T.fit_model(data["xt"], data["yt"], T.TRAIN_BATCH // 2)
    out = {{"state": model.state_dict(), "history": hist.epochs,
           "bypass": T.fit_model(data["xt"], data["yt"], T.TRAIN_BATCH // 2, bypass=True)[0].state_dict()}}
    # (b) sharded attacks and the sharded battery on a fixed trained model
    judge, _ = load_checkpoint(cfg["model"])
    res = T.run_all(judge, data["x"], data["y"])
    out["attacks"] = {{k: T.result_fields(v) for k, v in res.items()}}
    ev = T.battery(judge, data["x"], data["y"])
    out["evaluate"] = {{"x_adv": ev.x_adv, "status": ev.status, "per_attack": ev.per_attack,
                       "robust": ev.robust_accuracy, "sweep": ev.sweep, "flags": [f.name for f in ev.flags]}}
    torch.save(out, cfg["out"] + f".rank{{r}}")
    distributed.shutdown()
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, lenet_digits, digits_data):
    """Run the worker under ``torchrun --standalone --nproc_per_node 2`` (gloo, a free localhost
    port) once; returns (inputs, rank 0's outputs, rank 1's outputs)."""
    tmp = tmp_path_factory.mktemp("ddp")
    train, test = digits_data
    data = {"x": test.images[:N_ATTACK], "y": test.labels[:N_ATTACK],
            "xt": train.images[:N_TRAIN], "yt": train.labels[:N_TRAIN]}
    torch.save(data, tmp / "data.pt")
    save_checkpoint(lenet_digits, tmp / "model.pt")
    cfg = {"data": str(tmp / "data.pt"), "model": str(tmp / "model.pt"), "out": str(tmp / "out.pt")}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    (tmp / "worker.py").write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", ADVLAB_QUIET="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp / "worker.py"), str(tmp / "cfg.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    outs = [torch.load(f"{cfg['out']}.rank{r}", weights_only=False) for r in range(2)]
    return data, outs[0], outs[1]


def test_ddp_training_keeps_ranks_identical_and_matches_one_process(two_ranks):
    data, r0, r1 = two_ranks
    # DDP: every step applies the same averaged gradient on both ranks: identical weights, bit for bit
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the history is over both ranks' samples, the same on each
    for e0, e1 in zip(r0["history"], r1["history"]):
        assert e0["loss"] == e1["loss"] and e0["train_acc"] == e1["train_acc"]
    # one process with the same seed and batch TRAIN_BATCH sees the same batches (the strided
    # shard of the same permutation, half a batch per rank): the averaged gradient is the same
    # up to float summation order, so the weights agree closely but not bit for bit
    ref, hist = fit_model(data["xt"], data["yt"], TRAIN_BATCH)
    init = build_model("lenet5", 10, (1, 8, 8), seed=0).state_dict()
    assert (ref.state_dict()["fc1.weight"] - init["fc1.weight"]).abs().max() > 1e-2  # it did train
    for k, v in ref.state_dict().items():
        assert torch.allclose(r0["state"][k], v, rtol=1e-3, atol=1e-4), (k, (r0["state"][k] - v).abs().max())
        # a custom loss that bypasses the DDP wrapper: gradients averaged by fit, same training
        assert torch.equal(r0["bypass"][k], r1["bypass"][k]), k
        assert torch.allclose(r0["bypass"][k], v, rtol=1e-3, atol=1e-4), k
    assert r0["history"][-1]["loss"] == pytest.approx(hist.epochs[-1]["loss"], rel=1e-3)


def test_sharded_attacks_equal_one_process_sample_by_sample(two_ranks, lenet_digits):
    data, r0, r1 = two_ranks
    ref = run_all(lenet_digits, data["x"], data["y"])
    for name, res in ref.items():
        want = result_fields(res)
        for rank_out in (r0, r1):
            got = rank_out["attacks"][name]
            assert set(got) == set(want), name
            for k, v in want.items():
                if v is None:
                    assert got[k] is None, (name, k)
                else:
                    assert got[k].shape == v.shape and torch.equal(got[k], v), (name, k)
    # the seeded attacks did draw random numbers: a different seed changes the PGD result
    other = PGD(lenet_digits, eps=0.1, alpha=0.02, steps=5, seed=99).run((data["x"], data["y"]),
                                                                       batch_size=ATTACK_BATCH, progress=False)
    assert not torch.equal(other.l2, ref["pgd"].l2)


def test_sharded_battery_equals_one_process(two_ranks, lenet_digits):
    data, r0, r1 = two_ranks
    ev = battery(lenet_digits, data["x"], data["y"])
    for out in (r0["evaluate"], r1["evaluate"]):
        assert torch.equal(out["x_adv"], ev.x_adv)
        assert out["status"] == ev.status and out["per_attack"] == ev.per_attack
        assert out["robust"] == ev.robust_accuracy and out["sweep"] == ev.sweep
        assert out["flags"] == [f.name for f in ev.flags]


# --------------------------------------------------------------------------- one process

def test_single_process_helpers_need_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.init() == distributed.device() and not distributed.is_initialized()
    idx = torch.tensor([3, 0, 2, 1])
    out = distributed.gather({"v": torch.tensor([30, 0, 20, 10])}, idx)
    assert out["v"].tolist() == [0, 10, 20, 30]
    with pytest.raises(AdvlabError, match="exactly once"):
        distributed.gather({"v": torch.zeros(2)}, torch.tensor([0, 0]))
    assert distributed.gather_indexed({1: "b", 0: "a"}) == ["a", "b"]
    with pytest.raises(AdvlabError, match="exactly once"):
        distributed.gather_indexed({0: "a", 2: "c"})
    assert distributed.on_main(lambda a: a + 1, 1) == 2
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AdvlabError, match="shard=True"):
        FGSM(torch.nn.Flatten(), eps=0.1).run((torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)),
                                              shard=True)


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (8, 2)])
def test_shard_indices_partition(mode, n, world):
    parts = [distributed.shard_indices(n, r, world, mode) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if mode == "contiguous":
        assert torch.cat(parts).tolist() == list(range(n))


def test_tensor_batches_shard_rebuilds_the_single_process_batches():
    n, bs, world = 37, 8, 2
    ds = _Tensors(torch.arange(n).float().view(n, 1), torch.arange(n))
    single = list(_TensorBatches(ds, bs, torch.Generator().manual_seed(0)))
    ranks = [list(_TensorBatches(ds, bs // world, torch.Generator().manual_seed(0), r, world)) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == len(_TensorBatches(ds, bs // world, torch.Generator(), 1, world))
    # disjoint shards (up to DistributedSampler's one padded sample) covering everything
    seen = torch.cat([y for part in ranks for _, y in part])
    assert seen.numel() == n + 1 and set(seen.tolist()) == set(range(n))
    # the ranks' b-th batches together are the single process's b-th batch (all but the padded last)
    for b in range(len(single) - 1):
        both = torch.cat([ranks[r][b][1] for r in range(world)])
        assert sorted(both.tolist()) == sorted(single[b][1].tolist())


def test_seeded_run_depends_on_batches_not_on_how_they_arrive(lenet_digits, digits_data):
    x, y = digits_data[1].images[:40], digits_data[1].labels[:40]
    a = PGD(lenet_digits, eps=0.1, alpha=0.02, steps=3, seed=0).run((x, y), batch_size=16, progress=False,
                                                                     keep_adversarials=True)
    batches = [(x[i: i + 16], y[i: i + 16]) for i in range(0, 40, 16)]
    b = PGD(lenet_digits, eps=0.1, alpha=0.02, steps=3, seed=0).run(batches, progress=False, keep_adversarials=True,
                                                                     shard=False)
    assert torch.equal(a.adversarials, b.adversarials)
    # a second run of the same attack object continues the stream; reset() repeats the first
    atk = PGD(lenet_digits, eps=0.1, alpha=0.02, steps=3, seed=0)
    first = atk.run((x, y), batch_size=16, progress=False, keep_adversarials=True).adversarials
    assert not torch.equal(atk.run((x, y), batch_size=16, progress=False, keep_adversarials=True).adversarials, first)
    atk.reset()
    assert torch.equal(atk.run((x, y), batch_size=16, progress=False, keep_adversarials=True).adversarials, first)


def test_cli_evaluate_launcher_torchrun_writes_the_single_process_report(tmp_path, lenet_digits):
    """``advlab evaluate --launcher torchrun --nproc 2`` (rank 0 writes) gives the numbers of
    the single-process command."""
    from advlab.cli import main

    ckpt = save_checkpoint(lenet_digits, tmp_path / "m.pt", dataset="digits")
    common = ["evaluate", "--checkpoint", str(ckpt), "--eps", "0.1", "--n", "40", "--steps", "3",
              "--square-queries", "20", "--batch-size", "16", "--sweep", "none", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", ADVLAB_QUIET="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "advlab.cli", *common, "--out", str(tmp_path / "two"),
                           "--launcher", "torchrun", "--nproc", "2"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("report:") == 1  # rank 0 only
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("one", "two"))
    for key in ("clean_accuracy", "robust_accuracy", "per_attack", "detected", "flags", "standalone", "n"):
        assert one[key] == two[key], key
