"""The command line: listing, training, attacking, errors as one clear line."""

import gzip
import json
import struct

import numpy as np
import pytest

from advlab.cli import main


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def test_models_and_datasets_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "61,706" in out and "mobilenetv2" in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "folder"):
        assert name in out
    assert main(["datasets", "mnist"]) == 0
    assert "t10k-images-idx3-ubyte.gz" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "lenet6", "--dataset", "digits"], "unknown model 'lenet6'; valid names:"),
    (["train", "--model", "lenet5", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid names:"),
    (["train", "--model", "lenet5", "--dataset", "mnist", "--root", "/nonexistent/dir"], "missing"),
    (["attack", "--checkpoint", "/nonexistent.pt", "--attack", "fgsm"], "checkpoint not found"),
    (["reproduce", "no-such-thing"], "unknown reproduction 'no-such-thing'"),
])
def test_errors_are_one_line_without_traceback(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_debug_shows_the_exception(capsys):
    with pytest.raises(Exception, match="unknown model"):
        main(["train", "--model", "lenet6", "--dataset", "digits", "--debug"])


def test_train_then_attack_writes_checkpoint_and_report(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--model", "model-e", "--dataset", "digits", "--epochs", "4", "--out", str(ckpt),
                 "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out and ckpt.is_file()
    out = tmp_path / "rep"
    rc = main(["attack", "--checkpoint", str(ckpt), "--attack", "fgsm,pgd", "--eps", "0.2", "--steps", "5",
               "--n", "40", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| fgsm |" in printed and "| pgd |" in printed
    res = json.loads((out / "results.json").read_text())
    rows = res["tables"]["attack-results"]["rows"]
    assert [r["attack"] for r in rows] == ["fgsm", "pgd", "worst case"]
    for r in rows:
        assert r["n"] == 40 and 0 <= r["asr"] <= 1 and r["mean_linf"] <= 0.2 + 1e-6
    assert rows[1]["robust_acc"] <= rows[0]["robust_acc"]  # PGD at least as strong as FGSM
    # per-sample worst case: never more robust than any single attack
    assert rows[2]["robust_acc"] <= min(rows[0]["robust_acc"], rows[1]["robust_acc"])
    assert (out / "report.md").is_file() and (out / "examples.png").is_file() and (out / "attack-results.csv").is_file()
    # a parameter the attack does not take is refused by name
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "fgsm", "--steps", "3", "--out", str(out)]) == 2
    assert "does not take --steps" in capsys.readouterr().err
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "fgsm,pgd", "--theta", "1", "--out", str(out)]) == 2
    assert "none of the attacks fgsm, pgd takes --theta" in capsys.readouterr().err


def test_train_from_idx_files_and_download_from_a_mirror(tmp_path, capsys):
    rng = np.random.RandomState(0)
    src = tmp_path / "mirror"
    src.mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 10
        imgs = (rng.rand(n, 28, 28) * 40).astype(np.uint8)
        imgs[np.arange(n), labels * 2, :] = 255  # a class-dependent bright row: learnable
        _idx(src / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--model", "model-e", "--dataset", "mnist", "--root", str(src), "--epochs", "2",
                 "--out", str(ckpt), "--quiet"]) == 0
    # the official checksums do not match these tiny files: the download must refuse them
    assert main(["datasets", "--download", "mnist", "--root", str(tmp_path / "dl"), "--mirror", str(src)]) == 2
    err = capsys.readouterr().err
    assert "sha-256" in err.lower() or "checksum" in err.lower()
    assert not any((tmp_path / "dl").glob("*.gz"))


def test_reproduce_list(capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "name" in capsys.readouterr().out


def test_help_for_every_command(capsys):
    for cmd in ("datasets", "models", "train", "attack", "defend", "demo", "reproduce"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--eps" in capsys.readouterr().out


def test_reproduce_runs_a_users_own_yaml(tmp_path, capsys):
    """`advlab reproduce my.yaml`: the generic runner, a defense from the registry, white-box and
    transfer rows judged by the defended decision, and the per-sample worst case."""
    spec = tmp_path / "my.yaml"
    spec.write_text("name: mine\nseed: 0\ndataset: {name: digits, n: 40, only_correct: true}\n"
                    "model: {name: model-e, train: {epochs: 4, lr: 0.003}}\n"
                    "defense: {name: msvdd, params: {projections: 16, svdd_epochs: 2, finetune_epochs: 1}, beta: defense}\n"
                    "attacks:\n  - {name: FGSM, kind: fgsm, params: {eps: 0.2}}\n"
                    "  - {name: T, kind: pgd, params: {eps: 0.2, steps: 5}, threat: transfer, source: surrogate}\n"
                    "reported: {FGSM: 0.5}\n")
    out = tmp_path / "out"
    assert main(["reproduce", str(spec), "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [r["attack"] for r in rows] == ["FGSM", "T", "worst case"]
    assert [r["threat model"] for r in rows[:2]] == ["white-box", "transfer"] and rows[0]["robust_acc (reported)"] == 0.5
    for r in rows:
        assert abs(r["asr"] + r["failed"] + r["detected"] - 1) < 1e-9
    assert rows[2]["asr"] >= max(rows[0]["asr"], rows[1]["asr"])
    # the same spec into the same folder resumes from its stages (model, defense, attacks): same rows
    assert sorted(p.name.split("-")[0] for p in (out / ".stages").glob("*.pt")) == ["attacks", "defense", "model"]
    assert main(["reproduce", str(spec), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: digits}\nmodel: {name: model-e}\nattacks: [{kind: nope}]\n")
    assert main(["reproduce", str(bad), "--out", str(out)]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert main(["reproduce", str(tmp_path / "missing.yaml")]) == 2


def test_bound_command_writes_table_and_histogram(tmp_path):
    out = tmp_path / "bound"
    assert main(["bound", "--dataset", "digits", "--k", "1", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "bound-histogram.png").is_file() and "results" in res
    assert main(["bound", "--dataset", "nope", "--out", str(out)]) == 2


def test_defend_lists_registered_defenses(capsys, tmp_path):
    from advlab.defenses import DEFENSES

    assert {"msvdd", "pcl", "idefender", "vib"} <= set(DEFENSES)
    assert main(["defend", "nope", "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err
