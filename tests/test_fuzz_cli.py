"""Bad input on every ``advlab`` command: each case exits with code 2 and one line on stderr,
``advlab: error: ...``, naming the flag, name or file at fault; no traceback, no temporary or
half-written file. The last test counts this catalogue together with ``test_fuzz.py``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advlab.cli import main
from helpers import catalogue_params, check_cli_case, junk
from test_fuzz import CASES, HYPOTHESIS, absent, leftovers

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class CliCase:
    id: str
    argv: Callable[[Path, Dict[str, Path]], List[str]]
    match: str
    after: Optional[Callable[[Path], None]] = None
    xfail: Optional[str] = None


#: id -> case; ids are "cli/<command>/<bad input>"
CLI_CASES: Dict[str, CliCase] = {}


def cli(cid: str, match: str, argv, after=None, xfail: Optional[str] = None) -> None:
    cid = "cli/" + cid
    if cid in CLI_CASES:
        raise RuntimeError(f"duplicate CLI fuzz case id {cid!r}")
    CLI_CASES[cid] = CliCase(cid, argv, match, after, xfail)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, Path]:
    """A zoo checkpoint for the 8x8 digits (untrained: the bad input is caught before it matters),
    one without a dataset name, a corrupt file, a corrupt file whose first bytes look like a pickle's
    (the protocol opcode, then junk: torch warns of the protocol and fails) and a text file. The
    bytes are fixed, so a case that fails fails every run."""
    from advlab.models import build_model
    from advlab.train import save_checkpoint

    d = tmp_path_factory.mktemp("cli-files")
    model = build_model("lenet5", 10, (1, 8, 8), seed=0)
    out = {"ckpt": save_checkpoint(model, d / "digits.pt", dataset="digits"),
           "nodata": save_checkpoint(model, d / "nodata.pt"),
           "corrupt": d / "corrupt.pt", "garbled": d / "garbled.pt", "text": d / "notes.txt"}
    noise = junk(300)
    out["corrupt"].write_bytes(noise)
    out["garbled"].write_bytes(b"\x80\xd4" + noise)  # PROTO 212: not a protocol, not a pickle
    out["text"].write_text("not a checkpoint\n")
    return out


def _run(argv: List[str], capsys) -> tuple:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.err


# --------------------------------------------------------------------------- the catalogue

def _global():
    cli("unknown-command", r"invalid choice: 'attak'", lambda t, f: ["attak"])
    cli("unknown-flag", r"unrecognized arguments: --frobnicate", lambda t, f: ["models", "--frobnicate"])


def _datasets():
    cli("datasets/unknown-name", r"unknown dataset 'imagenet'.*valid names", lambda t, f: ["datasets", "imagenet"])
    cli("datasets/download-unknown", r"unknown downloadable dataset 'nope'",
        lambda t, f: ["datasets", "--download", "nope", "--root", str(t / "data")])
    cli("datasets/download-digits", r"unknown downloadable dataset 'digits'",
        lambda t, f: ["datasets", "--download", "digits", "--root", str(t / "data")])

    def mirror(t: Path, content: Optional[bytes]) -> str:
        m = t / "mirror"
        m.mkdir()
        if content is not None:
            for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                         "t10k-labels-idx1-ubyte.gz"):
                (m / name).write_bytes(content)
        return str(m)

    def empty_data(t: Path):
        d = t / "data"
        assert not d.exists() or not list(d.iterdir()), list(d.iterdir())

    cli("datasets/download-empty-mirror", r"could not download mnist file .*-ubyte\.gz",
        lambda t, f: ["datasets", "--download", "mnist", "--root", str(t / "data"), "--mirror", mirror(t, None)],
        after=empty_data)
    cli("datasets/download-wrong-checksum", r"checksum mismatch",
        lambda t, f: ["datasets", "--download", "mnist", "--root", str(t / "data"), "--mirror", mirror(t, b"junk")],
        after=empty_data)
    cli("datasets/download-missing-mirror-url", r"could not download",
        lambda t, f: ["datasets", "--download", "fashion-mnist", "--root", str(t / "data"), "--mirror",
                      (t / "gone").as_uri()], after=empty_data)


def _train():
    def tr(*extra: str, model: str = "lenet5", dataset: str = "digits"):
        return lambda t, f: ["train", "--model", model, "--dataset", dataset, "--epochs", "1", "--out",
                             str(t / "m.pt"), "--quiet", *extra]

    no_ckpt = absent("m.pt")
    cli("train/unknown-model", r"unknown model 'lenet6'.*valid names", tr(model="lenet6"), after=no_ckpt)
    cli("train/unknown-dataset", r"unknown dataset 'imagenet'", tr(dataset="imagenet"), after=no_ckpt)
    cli("train/mnist-missing-root", r"mnist train files missing in .*nowhere",
        lambda t, f: tr("--root", str(t / "nowhere"), dataset="mnist")(t, f), after=no_ckpt)
    cli("train/folder-without-root", r"folder.*root", tr(dataset="folder"), after=no_ckpt)
    cli("train/folder-missing", r"image folder not found",
        lambda t, f: tr("--root", str(t / "imgs"), dataset="folder")(t, f), after=no_ckpt)
    cli("train/missing-model-flag", r"required: --model", lambda t, f: ["train", "--dataset", "digits"])
    for v in ("-1",):
        cli(f"train/epochs={v}", r"\bepochs\b", tr("--epochs", v), after=no_ckpt)
    for v in ("abc", "1.5"):
        cli(f"train/epochs={v}", r"argument --epochs: invalid int", tr("--epochs", v))
    for v in ("0", "-0.1", "nan", "inf"):
        cli(f"train/lr={v}", r"\blr\b", tr("--lr", v), after=no_ckpt)
    cli("train/lr=abc", r"argument --lr: invalid float", tr("--lr", "abc"))
    for v in ("0", "-4"):
        cli(f"train/batch-size={v}", r"batch_size", tr("--batch-size", v), after=no_ckpt)
    cli("train/optimizer=nope", r"argument --optimizer: invalid choice: 'nope'", tr("--optimizer", "nope"))
    cli("train/schedule=nope", r"argument --schedule: invalid choice: 'nope'", tr("--schedule", "nope"))
    cli("train/seed=abc", r"argument --seed: invalid int", tr("--seed", "abc"))
    cli("train/device=nope", r"device.*'nope'", tr("--device", "nope"), after=no_ckpt)
    cli("train/device=cuda:99", r"device.*cuda:99", tr("--device", "cuda:99"), after=no_ckpt)

    def under_file(t: Path, f) -> List[str]:
        (t / "afile").write_text("x")
        return ["train", "--model", "model-e", "--dataset", "digits", "--epochs", "0", "--out",
                str(t / "afile" / "m.pt"), "--quiet"]

    cli("train/out-under-a-file", r"cannot write .*afile", under_file)

    def onto_dir(t: Path, f) -> List[str]:
        (t / "m.pt").mkdir()
        return ["train", "--model", "model-e", "--dataset", "digits", "--epochs", "0", "--out", str(t / "m.pt"),
                "--quiet"]

    cli("train/out-is-a-directory", r"cannot write .*m\.pt.*directory", onto_dir)


def _attack():
    def at(*extra: str, attack: str = "fgsm", ckpt: str = "ckpt"):
        return lambda t, f: ["attack", "--checkpoint", str(f[ckpt]) if ckpt in f else ckpt, "--attack", attack,
                             "--n", "4", "--out", str(t / "out"), "--quiet", *extra]

    no_report = absent("out")
    cli("attack/checkpoint-missing", r"checkpoint not found.*gone\.pt", at(ckpt="gone.pt"), after=no_report)
    cli("attack/checkpoint-corrupt", r"corrupt\.pt.*corrupt", at(ckpt="corrupt"), after=no_report)
    cli("attack/checkpoint-garbled-pickle", r"garbled\.pt.*corrupt", at(ckpt="garbled"), after=no_report)
    cli("attack/checkpoint-text-file", r"notes\.txt", at(ckpt="text"), after=no_report)
    cli("attack/checkpoint-names-no-dataset", r"--dataset is required", at(ckpt="nodata"), after=no_report)
    cli("attack/missing-checkpoint-flag", r"required: --checkpoint", lambda t, f: ["attack", "--attack", "fgsm"])
    cli("attack/unknown-dataset", r"unknown dataset 'imagenet'", at("--dataset", "imagenet"), after=no_report)
    cli("attack/unknown-attack", r"unknown attack 'fgsn'.*valid names", at(attack="fgsn"), after=no_report)
    cli("attack/unknown-attack-in-list", r"unknown attack 'nope'", at(attack="fgsm,nope"), after=no_report)
    cli("attack/no-attack-named", r"--attack names no attack", at(attack=","), after=no_report)
    for v in ("-0.1", "nan", "inf"):
        cli(f"attack/eps={v}", r"\beps\b", at("--eps", v), after=no_report)
    cli("attack/eps=abc", r"argument --eps: invalid eps 'abc'", at("--eps", "abc"))
    cli("attack/eps-list-with-negative", r"--eps must be finite and >= 0", at("--eps", "0.1,-0.2"), after=no_report)
    cli("attack/eps-list-with-nan", r"--eps\b", at("--eps", "0.1,nan"), after=no_report)
    for v in ("0", "-1"):
        cli(f"attack/steps={v}", r"\bsteps\b", at("--steps", v, attack="pgd"), after=no_report)
    cli("attack/steps=abc", r"argument --steps: invalid int", at("--steps", "abc", attack="pgd"))
    for v in ("0", "-3"):
        cli(f"attack/n={v}", r"\bn must be >= 1", lambda t, f, v=v: at(attack="fgsm")(t, f)[:5] + [
            "--n", v, "--out", str(t / "out"), "--quiet"], after=no_report)
    cli("attack/n=abc", r"argument --n: invalid int", at("--n", "abc"))
    cli("attack/norm=3-pgd", r"error: norm must be 'inf' or '2', got '3'", at("--norm", "3", attack="pgd"), after=no_report)
    cli("attack/norm=1-apgd", r"error: norm must be 'inf' or '2', got '1'", at("--norm", "1", attack="apgd"),
        after=no_report)
    cli("attack/norm=l1-square", r"error: norm must be 'inf' or '2'", at("--norm", "l1", attack="square"), after=no_report)
    cli("attack/alpha=nan-pgd", r"alpha", at("--alpha", "nan", attack="pgd"), after=no_report)
    cli("attack/alpha=-1-bim", r"alpha", at("--alpha", "-1", attack="bim"), after=no_report)
    cli("attack/batch-size=0", r"batch_size", at("--batch-size", "0"), after=no_report)
    cli("attack/decay=nan-mim", r"decay", at("--decay", "nan", attack="mim"), after=no_report)
    cli("attack/c=0-cw", r"\bc\b", at("--c", "0", attack="cw"), after=no_report)
    cli("attack/c=-1-lbfgs", r"\bc\b", at("--c", "-1", attack="lbfgs"), after=no_report)
    cli("attack/confidence=-1-cw", r"confidence", at("--confidence", "-1", attack="cw"), after=no_report)
    cli("attack/lr=0-cw", r"\blr\b", at("--lr", "0", attack="cw"), after=no_report)
    cli("attack/binary-search-steps=0-cw", r"binary_search_steps", at("--binary-search-steps", "0", attack="cw"),
        after=no_report)
    cli("attack/overshoot=-1-deepfool", r"overshoot", at("--overshoot", "-1", attack="deepfool"), after=no_report)
    cli("attack/num-candidates=1-deepfool", r"num_candidates", at("--num-candidates", "1", attack="deepfool"),
        after=no_report)
    cli("attack/theta=0-jsma", r"theta", at("--theta", "0", attack="jsma"), after=no_report)
    cli("attack/gamma=2-jsma", r"gamma", at("--gamma", "2", attack="jsma"), after=no_report)
    cli("attack/K=0-ka3", r"\bK\b", at("--K", "0", attack="ka3"), after=no_report)
    cli("attack/similarity=nope-ka3", r"similarity", at("--similarity", "nope", attack="ka3"), after=no_report)
    cli("attack/lam=0-ka3", r"lam", at("--lam", "0", attack="ka3"), after=no_report)
    cli("attack/flag-not-taken", r"attack 'deepfool' does not take --eps", at("--eps", "0.1", attack="deepfool"),
        after=no_report)
    cli("attack/flag-taken-by-none", r"none of the attacks fgsm, pgd takes --theta",
        at("--theta", "1", attack="fgsm,pgd"), after=no_report)
    cli("attack/seed=abc", r"argument --seed: invalid int", at("--seed", "abc"))
    cli("attack/device=nope", r"device.*'nope'", at("--device", "nope"), after=no_report)

    def under_file(t: Path, f) -> List[str]:
        (t / "afile").write_text("x")
        return ["attack", "--checkpoint", str(f["ckpt"]), "--attack", "fgsm", "--n", "2", "--out",
                str(t / "afile" / "rep"), "--quiet"]

    cli("attack/out-under-a-file", r"afile", under_file)


def _evaluate():
    def ev(*extra: str, ckpt: str = "ckpt", eps: Optional[str] = "0.1"):
        return lambda t, f: (["evaluate", "--checkpoint", str(f[ckpt]) if ckpt in f else ckpt, "--n", "4",
                              "--steps", "2", "--square-queries", "5", "--out", str(t / "out"), "--quiet"]
                             + (["--eps", eps] if eps is not None else []) + list(extra))

    no_report = absent("out")
    cli("evaluate/checkpoint-missing", r"not found.*gone\.pt", ev(ckpt="gone.pt"), after=no_report)
    cli("evaluate/checkpoint-corrupt", r"corrupt\.pt", ev(ckpt="corrupt"), after=no_report)
    cli("evaluate/checkpoint-names-no-dataset", r"--dataset is required", ev(ckpt="nodata"), after=no_report)
    cli("evaluate/unknown-dataset", r"unknown dataset 'imagenet'", ev("--dataset", "imagenet"), after=no_report)
    cli("evaluate/eps-missing", r"required: --eps", ev(eps=None))
    for v in ("-1", "nan", "inf"):
        cli(f"evaluate/eps={v}", r"--eps\b", ev(eps=v), after=no_report)
    cli("evaluate/eps=abc", r"argument --eps: invalid float", ev(eps="abc"))
    cli("evaluate/norm=3", r"error: norm must be 'inf' or '2', got '3'", ev("--norm", "3"), after=no_report)
    cli("evaluate/n=0", r"--n\b", ev("--n", "0"), after=no_report)
    cli("evaluate/steps=0", r"--steps", ev("--steps", "0"), after=no_report)
    cli("evaluate/square-queries=0", r"--square-queries", ev("--square-queries", "0"), after=no_report)
    cli("evaluate/batch-size=0", r"--batch-size", ev("--batch-size", "0"), after=no_report)
    cli("evaluate/targets=0", r"--targets", ev("--targets", "0"), after=no_report)
    cli("evaluate/targets=abc", r"argument --targets: invalid int", ev("--targets", "abc"))
    cli("evaluate/attacks=nope", r"--attacks.*APGD-CE", ev("--attacks", "nope"), after=no_report)
    cli("evaluate/attacks-empty", r"--attacks must name stages", ev("--attacks", ","), after=no_report)
    cli("evaluate/sweep=abc", r"--sweep", ev("--sweep", "abc"), after=no_report)
    cli("evaluate/sweep=negative", r"--sweep", ev("--sweep", "0.1,-0.2"), after=no_report)
    cli("evaluate/sweep=nan", r"--sweep", ev("--sweep", "nan"), after=no_report)
    cli("evaluate/reported=1.5", r"--reported", ev("--reported", "1.5"), after=no_report)
    cli("evaluate/reported=nan", r"--reported", ev("--reported", "nan"), after=no_report)
    cli("evaluate/launcher=nope", r"argument --launcher: invalid choice", ev("--launcher", "nope"))
    cli("evaluate/nproc=0", r"--nproc", ev("--launcher", "torchrun", "--nproc", "0"), after=no_report)
    cli("evaluate/device=nope", r"device.*'nope'", ev("--device", "nope"), after=no_report)


def _bound():
    def bd(*extra: str, dataset: str = "digits"):
        return lambda t, f: ["bound", "--dataset", dataset, "--out", str(t / "out"), "--quiet", *extra]

    no_report = absent("out")
    cli("bound/unknown-dataset", r"unknown dataset 'imagenet'", bd(dataset="imagenet"), after=no_report)
    cli("bound/mnist-missing-root", r"mnist train files missing",
        lambda t, f: bd("--root", str(t / "none"), dataset="mnist")(t, f), after=no_report)
    for v in ("0", "-1", "nan", "inf"):
        cli(f"bound/k={v}", r"--k\b", bd("--k", "1", v), after=no_report)
    cli("bound/k=abc", r"argument --k: invalid float", bd("--k", "abc"))
    for v in ("0", "-5"):
        cli(f"bound/subset={v}", r"--subset", bd("--subset", v), after=no_report)
    for v in ("0", "nan"):
        cli(f"bound/max-tile-mb={v}", r"--max-tile-mb", bd("--max-tile-mb", v), after=no_report)
    cli("bound/method=nope", r"argument --method: invalid choice", bd("--method", "nope"))
    cli("bound/split=val", r"argument --split: invalid choice", bd("--split", "val"))
    cli("bound/device=nope", r"device.*'nope'", bd("--device", "nope"), after=no_report)
    cli("bound/missing-dataset-flag", r"required: --dataset", lambda t, f: ["bound"])


def _defend():
    def df(*extra: str, defense: str = "msvdd", ckpt: str = "ckpt"):
        return lambda t, f: ["defend", defense, "--checkpoint", str(f[ckpt]) if ckpt in f else ckpt, "--out",
                             str(t / "out"), "--quiet", *extra]

    no_report = absent("out")
    cli("defend/unknown-defense", r"unknown defense 'svdd'.*valid names", df(defense="svdd"), after=no_report)
    cli("defend/missing-defense", r"required: defense", lambda t, f: ["defend", "--checkpoint", "x.pt"])
    cli("defend/checkpoint-missing", r"not found.*gone\.pt", df(ckpt="gone.pt"), after=no_report)
    cli("defend/checkpoint-corrupt", r"corrupt\.pt", df(ckpt="corrupt"), after=no_report)
    cli("defend/checkpoint-garbled-pickle", r"garbled\.pt.*corrupt", df(ckpt="garbled"), after=no_report)
    cli("defend/checkpoint-names-no-dataset", r"--dataset is required", df(ckpt="nodata"), after=no_report)
    cli("defend/unknown-dataset", r"unknown dataset 'imagenet'", df("--dataset", "imagenet"), after=no_report)
    for name in ("msvdd", "pcl", "idefender", "vib"):
        cli(f"defend/{name}-n=0", r"--n\b", df("--n", "0", defense=name), after=no_report)
        cli(f"defend/{name}-epochs=-1", r"--epochs", df("--epochs", "-1", defense=name), after=no_report)
    cli("defend/n=abc", r"argument --n: invalid int", df("--n", "abc"))
    cli("defend/device=nope", r"device.*'nope'", df("--device", "nope"), after=no_report)


def _demo():
    cli("demo/unknown-dataset", r"demo dataset must be one of digits", lambda t, f: ["demo", "--dataset", "cifar10",
                                                                                   "--out", str(t / "out")],
        after=absent("out"))
    cli("demo/mnist-missing-root", r"mnist train files missing",
        lambda t, f: ["demo", "--dataset", "mnist", "--root", str(t / "none"), "--out", str(t / "out"), "--quiet"],
        after=absent("out"))
    cli("demo/seed=abc", r"argument --seed: invalid int", lambda t, f: ["demo", "--seed", "abc"])
    cli("demo/device=nope", r"device.*'nope'", lambda t, f: ["demo", "--device", "nope", "--out", str(t / "out")],
        after=absent("out"))


def _reproduce():
    def spec(text, name: str = "my.yaml"):
        def argv(t: Path, f) -> List[str]:
            p = t / name
            p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
            return ["reproduce", str(p), "--out", str(t / "out"), "--quiet"]
        return argv

    no_report = absent("out")
    cli("reproduce/unknown-name", r"unknown reproduction 'pcl2'.*valid names",
        lambda t, f: ["reproduce", "pcl2", "--out", str(t / "out")], after=no_report)
    cli("reproduce/missing-yaml", r"spec file not found.*gone\.yaml",
        lambda t, f: ["reproduce", str(t / "gone.yaml"), "--out", str(t / "out")], after=no_report)
    cli("reproduce/bad-yaml", r"bad experiment spec", spec("attacks: [\n"), after=no_report)
    cli("reproduce/yaml-list", r"YAML mapping", spec("- a\n- b\n"), after=no_report)
    cli("reproduce/yaml-binary", r"my\.yaml", spec(b"\xff\xfe\x00\x80garbage"), after=no_report)
    base = "dataset: {name: digits, n: 4}\nmodel: {name: lenet5, train: {epochs: 1}}\nattacks:\n  - {kind: fgsm}\n"
    cli("reproduce/seed=text", r"seed", spec("seed: abc\n" + base), after=no_report)
    cli("reproduce/attacks=number", r"'attacks' must be a list", spec(base.replace("\n  - {kind: fgsm}", " 5")),
        after=no_report)
    cli("reproduce/attack-unknown-kind", r"unknown attack 'pgd9'", spec(base.replace("fgsm", "pgd9")),
        after=no_report)
    cli("reproduce/attack-eps=-1", r"attacks\[0\].*\beps\b",
        spec(base.replace("{kind: fgsm}", "{kind: fgsm, params: {eps: -1}}")),
        after=no_report)
    cli("reproduce/dataset-unknown", r"unknown dataset 'imagenet'", spec(base.replace("digits", "imagenet")),
        after=no_report)
    cli("reproduce/model-empty", r"model.*checkpoint", spec(base.replace("{name: lenet5, train: {epochs: 1}}", "{}")),
        after=no_report)
    cli("reproduce/defense-unknown", r"unknown defense 'nope'", spec(base + "defense: {name: nope}\n"),
        after=no_report)
    cli("reproduce/bundled-missing-data-root", r"nowhere|no data folder|missing",
        lambda t, f: ["reproduce", "ka3-attack", "--quick", "--data-root", str(t / "nowhere"), "--out",
                      str(t / "out"), "--quiet"])


for _section in (_global, _datasets, _train, _attack, _evaluate, _bound, _defend, _demo, _reproduce):
    _section()


@pytest.mark.parametrize("cid", catalogue_params(CLI_CASES))
def test_cli_bad_input(cid, tmp_path, files, capsys, monkeypatch):
    c = CLI_CASES[cid]
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, never in the repository
    rc, err = _run(c.argv(tmp_path, files), capsys)
    check_cli_case(c, rc, err, tmp_path, leftovers)


# --------------------------------------------------------------------------- hypothesis: drawn bad numbers

HYPOTHESIS["hyp/cli-bad-eps"] = "advlab attack and evaluate with a drawn negative, NaN or infinite --eps"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(["attack", "evaluate"]),
       eps=st.one_of(st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False), st.just(float("nan")),
                     st.just(float("inf")), st.just(float("-inf"))))
def test_hyp_cli_bad_eps(cmd, eps, files, capsys, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-eps")
    argv = [cmd, "--checkpoint", str(files["ckpt"]), "--n", "4", "--eps", repr(eps), "--out", str(out / "o"),
            "--quiet"] + (["--attack", "pgd"] if cmd == "attack" else [])
    rc, err = _run(argv, capsys)
    assert rc == 2 and err.startswith("advlab: error: ") and err.count("\n") == 1 and re.search(r"\beps\b", err), err
    assert not (out / "o").exists()


HYPOTHESIS["hyp/cli-bad-counts"] = "--n, --steps, --batch-size drawn <= 0 on attack, evaluate and train"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(["attack", "evaluate", "train"]), flag=st.sampled_from(["--n", "--steps", "--batch-size"]),
       value=st.integers(-10 ** 6, 0))
def test_hyp_cli_bad_counts(cmd, flag, value, files, capsys, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-n")
    if cmd == "train":
        if flag != "--batch-size":
            flag = "--epochs"
            value = min(value, -1)
        argv = ["train", "--model", "model-e", "--dataset", "digits", "--out", str(out / "m.pt"), "--quiet"]
    else:
        argv = [cmd, "--checkpoint", str(files["ckpt"]), "--eps", "0.1", "--out", str(out / "o"), "--quiet"]
        argv += ["--attack", "pgd"] if cmd == "attack" else []
    rc, err = _run(argv + [flag, str(value)], capsys)
    name = flag.lstrip("-").replace("-", "_")
    assert rc == 2 and err.startswith("advlab: error: ") and err.count("\n") == 1, err
    # the flag or the argument as a whole word ("n" alone is in almost any message)
    assert re.search(rf"{re.escape(flag)}\b|\b{name}\b", err), err
    assert not (out / "o").exists() and not (out / "m.pt").exists()


# --------------------------------------------------------------------------- the count

#: the distinct bad inputs this suite was built with (Python API + CLI + hypothesis families); the
#: catalogue may grow, never shrink below this
BUILT = 1414


def test_fuzz_catalogue_count(tmp_path, capsys):
    """Distinct named bad inputs over every entry point; writes nothing."""
    before = sorted(tmp_path.iterdir())
    from test_fuzz_load import LOAD_CASES, LOAD_CLI_CASES

    n_api, n_cli, n_hyp = len(CASES) + len(LOAD_CASES), len(CLI_CASES) + len(LOAD_CLI_CASES), len(HYPOTHESIS)
    total = n_api + n_cli + n_hyp
    assert not set(CASES) & set(CLI_CASES) and not (set(CASES) | set(CLI_CASES)) & (set(LOAD_CASES) | set(LOAD_CLI_CASES))
    entry_points = ({cid.split("/")[0] for cid in {**CASES, **LOAD_CASES}}
                    | {"/".join(cid.split("/")[:2]) for cid in {**CLI_CASES, **LOAD_CLI_CASES}})
    with capsys.disabled():
        print(f"\nadvlab fuzz catalogue: {total} distinct bad inputs ({n_api} Python API, {n_cli} CLI, {n_hyp} "
              f"hypothesis families) over {len(entry_points)} entry points; "
              f"{sum(1 for cat in (CASES, CLI_CASES, LOAD_CASES, LOAD_CLI_CASES) for c in cat.values() if c.xfail)} "
              "marked xfail")
    assert total >= BUILT
    assert sorted(tmp_path.iterdir()) == before
