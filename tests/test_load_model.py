"""Bring your own model and data (issue 19): the one model loader, data files, eps as 8/255.

One small model saved the four common ways (state dict + its code, TorchScript, torch.export with a
dynamic and with a fixed batch) and as ``.safetensors`` evaluates to the same robust accuracy,
sample by sample; hostile pickles run no code; ``advlab evaluate --model my_models:lenet`` works
from a folder that holds its own module. Bad inputs of the new entry points are in
``test_fuzz_load.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from advlab._util import AdvlabError, EpsUnitWarning, format_eps, parse_eps
from advlab.eval import evaluate
from advlab.models import load_model, load_model_info

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = '''
import torch
from torch import nn


def lenet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = lenet()

    def forward(self, x):
        return self.net(x), x.mean()


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _HF(_Pair):
    def forward(self, x):
        return _Out(self.net(x))


def pair():
    return _Pair()


def hf():
    return _HF()
'''


class _Evil:
    """A pickle that runs code when unpickled: writes a marker file (never allowed to happen)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_safetensors(path: Path, sd) -> Path:
    """The safetensors layout, written from its specification (8-byte header length, JSON header,
    raw little-endian buffers), independent of advlab's reader."""
    names = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
    header, chunks, offset = {}, [], 0
    for k, v in sd.items():
        raw = v.detach().contiguous().cpu().numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The model saved every way, in a folder with its module (advlab_byo_models.py)."""
    d = tmp_path_factory.mktemp("byo")
    (d / "advlab_byo_models.py").write_text(MODULE)
    (d / "my_models.py").write_text(MODULE)
    sys.path.insert(0, str(d))
    try:
        import advlab_byo_models as mm
    finally:
        sys.path.remove(str(d))
    m = mm.lenet().eval()
    ex = torch.rand(1, 1, 8, 8)
    torch.save(m.state_dict(), d / "lenet.pt")
    torch.save(m, d / "full.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates tracing; users still have .ts files
        torch.jit.trace(m, ex).save(str(d / "lenet.ts"))
    torch.export.save(torch.export.export(m, (ex,)), d / "fixed.pt2")
    torch.export.save(torch.export.export(m, (torch.rand(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), d / "lenet.pt2")
    write_safetensors(d / "lenet.safetensors", m.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)  # all correct when clean: every sample has something to lose
    return {"dir": d, "model": m, "x": x, "y": y}


SOURCES = [("factory", "advlab_byo_models:lenet", "lenet.pt"), ("safetensors", "advlab_byo_models:lenet",
                                                                 "lenet.safetensors"),
           ("torchscript", "lenet.ts", None), ("export", "lenet.pt2", None), ("export-fixed-batch", "fixed.pt2", None)]


def _load(saved, source, weights, monkeypatch, **kw):
    monkeypatch.chdir(saved["dir"])  # the user's module is importable from the working directory
    return load_model_info(source if ":" in source else saved["dir"] / source,
                           None if weights is None else saved["dir"] / weights, **kw)


def test_four_formats_same_robust_accuracy_sample_by_sample(saved, monkeypatch):
    x, y = saved["x"], saved["y"]
    ref = evaluate(saved["model"], x, y, eps=8 / 255, attacks=("APGD-CE",), steps=5, checks=False, progress=False)
    assert 0 < ref.robust_accuracy < 1, "the reference must be a mixed result for the comparison to mean something"
    for name, source, weights in SOURCES:
        loaded = _load(saved, source, weights, monkeypatch)
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), saved["model"](x), atol=1e-5), name
        res = evaluate(loaded.model, x, y, eps=8 / 255, attacks=("APGD-CE",), steps=5, checks=False, progress=False)
        assert res.status == ref.status, name
        assert res.robust_accuracy == ref.robust_accuracy, name
        assert torch.allclose(torch.as_tensor(res.x_adv), torch.as_tensor(ref.x_adv), atol=1e-4), name


def test_formats_are_told_by_content_not_suffix(saved, monkeypatch, tmp_path):
    d = saved["dir"]
    for src, fmt in (("lenet.ts", "TorchScript"), ("lenet.pt2", "torch.export")):
        odd = tmp_path / ("model.bin" if fmt == "TorchScript" else "model.pt")
        odd.write_bytes((d / src).read_bytes())
        assert load_model_info(odd).format == fmt
    info = _load(saved, "lenet.pt2", None, monkeypatch)
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    fixed = _load(saved, "fixed.pt2", None, monkeypatch)
    assert any("fixed batch of 1" in n for n in fixed.notes)
    assert fixed.model(saved["x"][:5]).shape == (5, 10)
    fixed.model.train()  # a torch.export graph refuses train()/eval(); the wrapper keeps the flag only
    fixed.model.eval()


def test_plain_pickle_refused_with_the_three_safe_formats(saved):
    with pytest.raises(AdvlabError) as info:
        load_model(saved["dir"] / "full.pt")
    msg = str(info.value)
    assert "\n" not in msg and "plain pickle" in msg
    assert "torch.export.save" in msg and "torch.jit.trace" in msg and "--weights" in msg


@pytest.mark.parametrize("where", ["pt", "pt2-named", "weights", "export-member"])
def test_hostile_pickle_runs_no_code(where, saved, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save({"state_dict": {}, "x": _Evil(marker)}, buf)
    if where == "export-member":  # a real torch.export archive whose sample inputs are a hostile pickle
        evil = tmp_path / "evil.pt2"
        bad = io.BytesIO()
        torch.save(((_Evil(marker),), {}), bad)
        with zipfile.ZipFile(saved["dir"] / "lenet.pt2") as src, zipfile.ZipFile(evil, "w") as dst:
            for n in src.namelist():
                dst.writestr(n, bad.getvalue() if n.endswith("sample_inputs/model.pt") else src.read(n))
        call = lambda: load_model(evil)  # noqa: E731
    else:
        evil = tmp_path / ("evil.pt2" if where == "pt2-named" else "evil.pt")
        evil.write_bytes(buf.getvalue())
        call = (lambda: _load(saved, "advlab_byo_models:lenet", evil, monkeypatch)) if where == "weights" \
            else (lambda: load_model(evil))
    with pytest.raises(AdvlabError) as info:
        call()
    assert not marker.exists(), "code from the file ran"
    msg = str(info.value)
    assert "\n" not in msg and "evil.pt" in msg
    assert ("pickle" in msg) and "Traceback" not in msg


def test_mean_std_wrap_and_num_classes(saved, monkeypatch):
    x = saved["x"]
    loaded = _load(saved, "lenet.ts", None, monkeypatch, mean=0.5, std=0.25, num_classes=10)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), saved["model"]((x - 0.5) / 0.25), atol=1e-5)
    assert any("normalised" in n for n in loaded.notes)
    with pytest.raises(AdvlabError, match="num_classes is 7 but the model .* gives 10"):
        _load(saved, "lenet.pt2", None, monkeypatch, num_classes=7)


@pytest.mark.parametrize("factory,how", [("pair", "first element"), ("hf", ".logits")])
def test_tuple_and_logits_outputs_are_unwrapped(factory, how, saved, monkeypatch):
    loaded = _load(saved, f"advlab_byo_models:{factory}", None, monkeypatch, input_shape=(1, 8, 8))  # same seed
    assert any(how in n for n in loaded.notes)
    with torch.no_grad():
        assert torch.allclose(loaded.model(saved["x"]), saved["model"](saved["x"]), atol=1e-6)


def test_eps_parser_and_report_format():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.3") == 0.3 and parse_eps("2e-2") == 0.02 and parse_eps(0.5) == 0.5 and parse_eps(" 4 / 255 ")
    for bad in ("abc", "8/0", "-8/255", "nan", "inf", "1/2/3", "", None, True):
        with pytest.raises(AdvlabError, match="eps"):
            parse_eps(bad)
    assert format_eps(8 / 255) == "8/255 = 0.03137"
    assert format_eps(0.3) == "0.3 (76.5/255)"


def test_eps_unit_warnings(saved):
    m, x, y = saved["model"], saved["x"][:2], saved["y"][:2]
    with pytest.warns(EpsUnitWarning, match=r"whole \[0, 1\] pixel range.*8/255 = 0.03137"):
        evaluate(m, x, y, eps=8, attacks=("APGD-CE",), steps=1, checks=False, progress=False)
    with pytest.warns(EpsUnitWarning, match=r"diameter.*sqrt\(64\) = 8"):
        evaluate(m, x, y, norm="2", eps=100, attacks=("APGD-CE",), steps=1, checks=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EpsUnitWarning)
        evaluate(m, x, y, eps="8/255", attacks=("APGD-CE",), steps=1, checks=False, progress=False)
        evaluate(m, x, y, norm="2", eps=2.0, attacks=("APGD-CE",), steps=1, checks=False, progress=False)


def test_data_files_layouts(tmp_path):
    from advlab.data.arrays import load_arrays

    rng = np.random.RandomState(0)
    x = rng.rand(5, 8, 8, 3)
    y = np.arange(5)
    np.savez(tmp_path / "nhwc.npz", x=(x * 255).astype(np.uint8), y=y)
    np.savez(tmp_path / "nchw.npz", images=x.transpose(0, 3, 1, 2).astype(np.float32), labels=y)
    np.save(tmp_path / "x.npy", x[..., 0].astype(np.float32))
    np.save(tmp_path / "y.npy", y)
    a, notes_a = load_arrays(tmp_path / "nhwc.npz")
    b, notes_b = load_arrays(tmp_path / "nchw.npz")
    c, notes_c = load_arrays(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert a.images.shape == b.images.shape == (5, 3, 8, 8) and c.images.shape == (5, 1, 8, 8)
    assert torch.allclose(a.images, b.images, atol=1 / 255)
    assert any("NHWC" in n for n in notes_a) and any("scaled" in n for n in notes_a)
    assert any("NCHW" in n for n in notes_b) and any("(N, H, W)" in n for n in notes_c)
    assert a.labels.tolist() == y.tolist()


def _pngs(root: Path, mode: str, size: int, n: int = 2) -> Path:
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in ("0", "1"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray((rng.rand(*shape) * 255).astype(np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_folder_follows_the_model_input(saved, tmp_path, monkeypatch, capsys):
    """The issue's case: grayscale PNGs and a 1-channel model; and RGB 10x10 PNGs read as 8x8 gray
    for a program whose input shape the file states."""
    from advlab.cli import main

    monkeypatch.delenv("ADVLAB_QUIET", raising=False)  # the log says what was detected
    gray = _pngs(tmp_path / "gray", "L", 8)
    rgb = _pngs(tmp_path / "rgb", "RGB", 10)
    monkeypatch.chdir(saved["dir"])
    rc = main(["attack", "--model", "lenet.ts", "--dataset", "folder", "--root", str(gray), "--attack", "fgsm",
               "--eps", "8/255", "--n", "4", "--out", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    rc = main(["evaluate", "--model", "lenet.pt2", "--data", str(rgb), "--eps", "8/255", "--n", "4", "--steps", "2",
               "--attacks", "APGD-CE", "--sweep", "none", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "read as grayscale" in err and "resized from 10x10 to 8x8" in err
    res = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    assert res["model"]["format"] == "torch.export" and res["eps_255"] == pytest.approx(8.0)
    assert "8/255 = 0.03137" in (tmp_path / "e" / "report.md").read_text()


def test_cli_evaluate_own_module_in_a_fresh_folder(saved, tmp_path):
    """`advlab evaluate --model my_models:lenet --weights lenet.pt --data test.npz --eps 8/255` from a
    folder that holds the user's module (the console script: the folder is not on sys.path)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_models.py").write_text(MODULE)
    (work / "lenet.pt").write_bytes((saved["dir"] / "lenet.pt").read_bytes())
    x = (saved["x"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # NHWC uint8, as saved elsewhere
    np.savez(work / "test.npz", x=x, y=saved["y"].numpy())
    exe = Path(sys.executable).with_name("advlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from advlab.cli import main; "
                                                                 "sys.exit(main())"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    env.pop("ADVLAB_QUIET", None)  # the log says what was detected
    proc = subprocess.run(cmd + ["evaluate", "--model", "my_models:lenet", "--weights", "lenet.pt", "--data",
                                 "test.npz", "--eps", "8/255", "--n", "12", "--steps", "3", "--attacks", "APGD-CE",
                                 "--sweep", "none", "--out", "out"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "NHWC" in proc.stderr and "scaled to [0, 1]" in proc.stderr
    res = json.loads((work / "out" / "results.json").read_text())["results"]
    assert res["eps"] == pytest.approx(8 / 255) and res["n"] == 12
    assert res["model"]["source"] == "my_models:lenet" and res["model"]["weights"] == "lenet.pt"


def test_cli_warns_on_eps_units(saved, tmp_path, monkeypatch, capsys):
    from advlab.cli import main

    np.savez(tmp_path / "t.npz", x=saved["x"].numpy(), y=saved["y"].numpy())
    monkeypatch.chdir(saved["dir"])
    rc = main(["evaluate", "--model", "lenet.ts", "--data", str(tmp_path / "t.npz"), "--eps", "8", "--n", "2",
               "--steps", "1", "--attacks", "APGD-CE", "--sweep", "none", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    warn = [line for line in err.splitlines() if line.startswith("advlab: warning:")]
    assert len(warn) == 1 and "8/255 = 0.03137" in warn[0]


def test_spec_model_source_and_eps_fraction(saved, tmp_path, monkeypatch):
    from advlab.eval.specs import run_spec

    np.savez(tmp_path / "t.npz", x=saved["x"].numpy(), y=saved["y"].numpy())
    monkeypatch.chdir(saved["dir"])
    spec = {"name": "byo", "seed": 0, "dataset": {"name": "digits", "n": 6},
            "model": {"source": "advlab_byo_models:lenet", "weights": "lenet.safetensors"},
            "attacks": [{"name": "FGSM", "kind": "fgsm", "params": {"eps": "8/255"}}]}
    rep = run_spec(spec, tmp_path / "r", resume=False)
    assert rep.results["rows"][0]["n"] == 6
