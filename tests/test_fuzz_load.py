"""Bad input on the entry points of issue 19 (bring your own model and data): the one model loader
(``advlab.models.load_model``), weights and safetensors files, numpy data files, the eps parser,
``advlab.models.inputs.load_inputs``, and the new flags of ``advlab attack`` / ``advlab evaluate``
(``--model --weights --mean --std --num-classes --data --labels --dataset-option``, eps fractions).

The catalogue style of ``test_fuzz.py`` / ``test_fuzz_cli.py``: ``LOAD_CASES`` (Python API, each
must raise ``AdvlabError`` matching its pattern, in one line) and ``LOAD_CLI_CASES`` (exit code 2,
one ``advlab: error:`` line on stderr); hostile pickles also check that no code ran (the marker
file is absent). ``test_fuzz_cli.test_fuzz_catalogue_count`` counts the other two catalogues;
these are counted by ``test_fuzz_load_catalogue_count`` here.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch import nn

from helpers import catalogue_params, check_api_case, check_cli_case
from test_fuzz import Case, absent, leftovers
from test_fuzz_cli import CliCase, _run

pytestmark = pytest.mark.usefixtures("one_thread")

#: id -> case; ids are "<entry point>/<bad input>"
LOAD_CASES: Dict[str, Case] = {}
#: id -> case; ids are "cli/<command>/<bad input>"
LOAD_CLI_CASES: Dict[str, CliCase] = {}

MODULE = '''
import torch
from torch import nn


def lenet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def three_d():
    return nn.Conv2d(1, 2, 3)


def boom():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42


NUMBER = 5
'''


def bad(cid: str, match: str, run, after=None) -> None:
    if cid in LOAD_CASES:
        raise RuntimeError(f"duplicate fuzz case id {cid!r}")
    LOAD_CASES[cid] = Case(cid, run, match, after)


def cli(cid: str, match: str, argv, after=None) -> None:
    cid = "cli/" + cid
    if cid in LOAD_CLI_CASES:
        raise RuntimeError(f"duplicate CLI fuzz case id {cid!r}")
    LOAD_CLI_CASES[cid] = CliCase(cid, argv, match, after)


class _Evil:
    """A pickle that runs code when unpickled: writes a marker file (never allowed to happen)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- files the cases build

def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()


def _module(tmp: Path) -> Path:
    """The user's module, importable from ``tmp`` (a unique name per folder: no import cache between cases)."""
    name = f"byo_{abs(hash(str(tmp))) % 10 ** 9}"
    (tmp / f"{name}.py").write_text(MODULE)
    return tmp / name


def _factory(tmp: Path, attr: str = "lenet") -> str:
    import os

    os.chdir(tmp)  # the cases run with tmp as the working directory (restored by the test)
    return f"{_module(tmp).name}:{attr}"


def _torch(tmp: Path, name: str, obj) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    (tmp / name).write_bytes(buf.getvalue())
    return tmp / name


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _ts(tmp: Path, name: str = "m.ts") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_lenet(), torch.rand(1, 1, 8, 8)).save(str(tmp / name))
    return tmp / name


_EXPORT: Dict[str, bytes] = {}


def _pt2(tmp: Path, name: str = "m.pt2") -> Path:
    if "m" not in _EXPORT:  # exporting takes a second: once per session
        buf = io.BytesIO()
        torch.export.save(torch.export.export(_lenet(), (torch.rand(2, 1, 8, 8),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), buf)
        _EXPORT["m"] = buf.getvalue()
    return _write(tmp, name, _EXPORT["m"])


def _pt2_with(tmp: Path, member_suffix: str, data: bytes, add: bool = False) -> Path:
    src = _pt2(tmp, "clean.pt2")
    out = tmp / "evil.pt2"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as dst:
        prefix = z.namelist()[0].split("/")[0]
        for n in z.namelist():
            dst.writestr(n, data if not add and n.endswith(member_suffix) else z.read(n))
        if add:
            dst.writestr(f"{prefix}/{member_suffix}", data)
    return out


def _evil_bytes(marker: Path, obj=None) -> bytes:
    buf = io.BytesIO()
    torch.save(obj if obj is not None else {"state_dict": {}, "x": _Evil(marker)}, buf)
    return buf.getvalue()


def _safetensors(tmp: Path, header, payload: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    return _write(tmp, "w.safetensors", len(text).to_bytes(8, "little") + text + payload)


def _npz(tmp: Path, name: str = "d.npz", **arrays) -> Path:
    np.savez(tmp / name, **arrays)
    return tmp / name


X8 = (np.random.RandomState(0).rand(4, 1, 8, 8)).astype(np.float32)
Y4 = np.array([0, 1, 2, 3])


# --------------------------------------------------------------------------- Python API

def _load_model_cases():
    from advlab.models import load_model, load_model_info
    from advlab.train import save_checkpoint, write_checkpoint
    from advlab.models import build_model

    L = load_model
    marker = lambda tmp: tmp / "PWNED"  # noqa: E731
    no_code = absent("PWNED")

    bad("load_model/missing-file", r"not found.*gone\.pt", lambda t: L(t / "gone.pt"))
    bad("load_model/folder", r"is a folder; --model takes a model file", lambda t: L(t))
    bad("load_model/empty-file", r"empty\.pt.*corrupt", lambda t: L(_write(t, "empty.pt", b"")))
    bad("load_model/random-bytes", r"junk\.pt.*corrupt", lambda t: L(_write(t, "junk.pt", bytes(range(256)) * 2)))
    bad("load_model/text-file", r"notes\.txt.*corrupt", lambda t: L(_write(t, "notes.txt", b"hello\n")))
    bad("load_model/zip-of-something-else", r"other\.zip.*corrupt", lambda t: L(_zip(t)))
    bad("load_model/plain-pickle-model", r"full\.pt is a plain pickle.*torch\.export\.save.*torch\.jit\.trace",
        lambda t: L(_torch(t, "full.pt", _lenet())))
    bad("load_model/hostile-pickle-pt", r"evil\.pt is a plain pickle",
        lambda t: L(_write(t, "evil.pt", _evil_bytes(marker(t)))), after=no_code)
    bad("load_model/hostile-pickle-named-pt2", r"evil\.pt2 is a plain pickle",
        lambda t: L(_write(t, "evil.pt2", _evil_bytes(marker(t)))), after=no_code)
    bad("load_model/hostile-legacy-pickle", r"evil\.pkl is a plain pickle",
        lambda t: L(_write(t, "evil.pkl", pickle.dumps({"x": _Evil(marker(t))}, protocol=2))), after=no_code)
    bad("load_model/hostile-legacy-pickle-protocol-5", r"evil5\.pkl is a plain pickle",
        lambda t: L(_write(t, "evil5.pkl", pickle.dumps({"x": _Evil(marker(t))}, protocol=5))), after=no_code)
    bad("load_model/truncated-legacy-pickle", r"cut\.pkl.*corrupt",
        lambda t: L(_write(t, "cut.pkl", pickle.dumps({"x": _Evil(marker(t))}, protocol=2)[:-9])), after=no_code)
    bad("load_model/pickle-opcode-then-junk", r"garbled\.pt.*corrupt",
        lambda t: L(_write(t, "garbled.pt", b"\x80\xd4" + bytes(range(256)) * 2)))
    bad("load_model/hostile-export-sample-inputs", r"refusing torch\.export archive .*evil\.pt2.*sample_inputs",
        lambda t: L(_pt2_with(t, "sample_inputs/model.pt", _evil_bytes(marker(t), ((_Evil(marker(t)),), {})))),
        after=no_code)
    bad("load_model/hostile-export-extra-pickle", r"refusing torch\.export archive .*payload\.pt",
        lambda t: L(_pt2_with(t, "data/weights/payload.pt", _evil_bytes(marker(t)), add=True)), after=no_code)
    bad("load_model/export-pickled-weight-config", r"refusing torch\.export archive",
        lambda t: L(_pt2_with(t, "data/weights/model_weights_config.json",
                              json.dumps({"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}).encode())))
    bad("load_model/export-compiled-code", r"compiled code",
        lambda t: L(_pt2_with(t, "data/aotinductor/model/m.so", b"\x7fELF", add=True)))
    bad("load_model/export-truncated", r"trunc\.pt2.*corrupt",
        lambda t: L(_write(t, "trunc.pt2", _pt2(t).read_bytes()[:-300])))
    bad("load_model/export-bad-model-json", r"cannot read torch\.export program .*: corrupt or from another torch version",
        lambda t: L(_pt2_with(t, "models/model.json", b"{not json")))
    bad("load_model/torchscript-truncated", r"trunc\.ts.*corrupt",
        lambda t: L(_write(t, "trunc.ts", _ts(t).read_bytes()[:-400])))
    bad("load_model/state-dict-without-factory", r"sd\.pt holds only weights.*--weights",
        lambda t: L(_torch(t, "sd.pt", _lenet().state_dict())))
    bad("load_model/safetensors-as-model", r"safetensors.*--weights",
        lambda t: L(_safetensors(t, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)))
    bad("load_model/bare-tensor", r"t\.pt is not an advlab checkpoint.*Tensor",
        lambda t: L(_torch(t, "t.pt", torch.zeros(3))))
    bad("load_model/unknown-advlab-format", r"format 'advlab-future-9'",
        lambda t: L(write_checkpoint(t / "f.pt", {}, {}, format="advlab-future-9")))
    bad("load_model/checkpoint-weights-do-not-fit", r"c\.pt does not fit",
        lambda t: L(write_checkpoint(t / "c.pt", {"x": torch.zeros(1)}, {"model": {
            "name": "lenet5", "num_classes": 10, "in_shape": [1, 8, 8]}})))
    bad("load_model/source=None", r"model source", lambda t: L(None))
    bad("load_model/source=5", r"model source", lambda t: L(5))
    bad("load_model/source-empty", r"model source", lambda t: L(""))
    bad("load_model/factory-module-missing", r"cannot import 'no_such_mod_xyz'.*working directory",
        lambda t: L("no_such_mod_xyz:lenet"))
    bad("load_model/factory-attr-missing", r"has no 'nothing'", lambda t: L(_factory(t, "nothing")))
    bad("load_model/factory-raises", r"raised RuntimeError: factory exploded", lambda t: L(_factory(t, "boom")))
    bad("load_model/factory-returns-int", r"must return a torch\.nn\.Module, got int",
        lambda t: L(_factory(t, "not_a_module")))
    bad("load_model/factory-not-callable", r"is a int, not a callable", lambda t: L(_factory(t, "NUMBER")))
    bad("load_model/factory-import-raises", r"importing .* failed: ZeroDivisionError", lambda t: L(_raising(t)))
    bad("load_model/factory-imports-missing-dependency", r"importing .* failed: ModuleNotFoundError.*not_installed_xyz",
        lambda t: L(_raising(t, "import not_installed_xyz\n")))
    bad("load_model/weights-missing", r"weights file not found.*gone\.pt",
        lambda t: L(_factory(t), weights=t / "gone.pt"))
    bad("load_model/weights-hostile-pickle", r"evil\.pt is a plain pickle",
        lambda t: L(_factory(t), weights=_write(t, "evil.pt", _evil_bytes(marker(t)))), after=no_code)
    bad("load_model/weights-hostile-legacy-pickle", r"evil\.pkl is a plain pickle",
        lambda t: L(_factory(t), weights=_write(t, "evil.pkl", pickle.dumps(_Evil(marker(t)), protocol=2))),
        after=no_code)
    bad("load_model/weights-wrong-names", r"do not fit .*missing 4.*unexpected 1",
        lambda t: L(_factory(t), weights=_torch(t, "w.pt", {"fc.weight": torch.zeros(2)})))
    bad("load_model/weights-wrong-shapes", r"do not fit .*size mismatch",
        lambda t: L(_factory(t), weights=_torch(t, "w.pt", {**_lenet().state_dict(), "3.bias": torch.zeros(7)})))
    bad("load_model/weights-not-a-state-dict", r"w\.pt holds a list, not a state dict",
        lambda t: L(_factory(t), weights=_torch(t, "w.pt", [1, 2])))
    bad("load_model/weights-torchscript", r"TorchScript archive, which holds the whole model",
        lambda t: L(_factory(t), weights=_ts(t)))
    bad("load_model/weights-export", r"torch\.export program, which holds the whole model",
        lambda t: L(_factory(t), weights=_pt2(t)))
    bad("load_model/weights-text-file", r"w\.txt.*not a weights file",
        lambda t: L(_factory(t), weights=_write(t, "w.txt", b"weights\n")))
    bad("load_model/weights-with-a-model-file", r"weights .* go with a factory source",
        lambda t: L(_ts(t), weights=_torch(t, "w.pt", _lenet().state_dict())))
    bad("load_model/safetensors-offsets-lie", r"safetensors file .*corrupt.*data_offsets",
        lambda t: L(_factory(t), weights=_safetensors(t, {"0.weight": {"dtype": "F32", "shape": [4, 1, 3, 3],
                                                                          "data_offsets": [0, 8]}}, b"\0" * 8)))
    bad("load_model/safetensors-bad-dtype", r"safetensors file .*unsupported dtype",
        lambda t: L(_factory(t), weights=_safetensors(t, {"w": {"dtype": "F128", "shape": [1],
                                                                   "data_offsets": [0, 16]}}, b"\0" * 16)))
    bad("load_model/safetensors-truncated-header", r"safetensors file .*corrupt",
        lambda t: L(_factory(t), weights=_write(t, "w.safetensors", (1000).to_bytes(8, "little") + b"{\"a\": 1")))
    bad("load_model/safetensors-beyond-buffer", r"safetensors file .*corrupt",
        lambda t: L(_factory(t), weights=_safetensors(t, {"w": {"dtype": "F32", "shape": [100],
                                                                   "data_offsets": [0, 400]}}, b"\0" * 8)))
    bad("load_model/mean-without-std", r"mean and std go together", lambda t: L(_ts(t), mean=0.5))
    bad("load_model/mean-text", r"mean must be numbers", lambda t: L(_ts(t), mean="a,b", std="0.5"))
    bad("load_model/std-zero", r"std must be > 0", lambda t: L(_ts(t), mean=0.5, std=0.0))
    bad("load_model/mean-nan", r"mean must hold finite", lambda t: L(_ts(t), mean=float("nan"), std=0.5))
    bad("load_model/mean-wrong-channels", r"mean/std have 3 values but .* 1 channel",
        lambda t: L(_ts(t), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2], input_shape=(1, 8, 8)))
    bad("load_model/mean-on-advlab-checkpoint", r"normalises its input itself",
        lambda t: L(save_checkpoint(build_model("lenet5", 10, (1, 8, 8)), t / "z.pt"), mean=0.5, std=0.5))
    bad("load_model/num_classes-mismatch", r"num_classes is 7 but the model .* gives 10",
        lambda t: L(_pt2(t), num_classes=7))
    bad("load_model/num_classes=1", r"num_classes must be an integer >= 2", lambda t: L(_ts(t), num_classes=1))
    bad("load_model/num_classes=2.5", r"num_classes must be an integer", lambda t: L(_ts(t), num_classes=2.5))
    bad("load_model/input_shape-two-dims", r"input_shape must be \(C, H, W\)", lambda t: L(_ts(t), input_shape=(8, 8)))
    bad("load_model/input_shape-does-not-fit", r"images of shape \(3, 8, 8\) do not fit the model",
        lambda t: L(_ts(t), input_shape=(3, 8, 8)))
    bad("load_model/output-not-logits", r"must give logits of shape \(N, num_classes\).*got shape \(2, 2, 6, 6\)",
        lambda t: L(_factory(t, "three_d"), input_shape=(1, 8, 8)))
    bad("load_model/device=nope", r"device", lambda t: L(_ts(t), device="nope"))
    bad("load_model_info/hostile-pickle", r"evil\.pt is a plain pickle",
        lambda t: load_model_info(_write(t, "evil.pt", _evil_bytes(marker(t)))), after=no_code)


def _zip(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    return tmp / "other.zip"


def _raising(tmp: Path, body: str = "1 / 0\n") -> str:
    import os

    os.chdir(tmp)
    name = f"raising_{abs(hash(str(tmp) + body)) % 10 ** 9}"
    (tmp / f"{name}.py").write_text(body)
    return f"{name}:f"


def _read_weights_cases():
    from advlab.models import read_safetensors, read_weights

    bad("read_weights/missing", r"weights file not found", lambda t: read_weights(t / "nope.pt"))
    bad("read_weights/empty-state-dict", r"e\.pt holds a dict, not a state dict", lambda t: read_weights(
        _torch(t, "e.pt", {})))
    bad("read_safetensors/header-not-an-object", r"safetensors file .*not a JSON object",
        lambda t: read_safetensors(_safetensors(t, [1, 2])))
    bad("read_safetensors/negative-dimension", r"safetensors file .*negative",
        lambda t: read_safetensors(_safetensors(t, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})))


def _array_cases():
    from advlab.data.arrays import load_arrays

    A = load_arrays
    bad("load_arrays/missing", r"data file not found.*gone\.npz", lambda t: A(t / "gone.npz"))
    bad("load_arrays/text-file", r"d\.npz is not a numpy", lambda t: A(_write(t, "d.npz", b"x,y\n1,2\n")))
    bad("load_arrays/random-zip", r"no images array", lambda t: A(_zip(t)))
    bad("load_arrays/object-array", r"holds Python objects", lambda t: A(_objects(t)))
    bad("load_arrays/npz-no-images", r"no images array.*x, images.*holds: a, y",
        lambda t: A(_npz(t, a=X8, y=Y4)))
    bad("load_arrays/npz-no-labels", r"no labels array.*holds: x", lambda t: A(_npz(t, x=X8)))
    bad("load_arrays/x_key-unknown", r"no array 'pics'", lambda t: A(_npz(t, x=X8, y=Y4), x_key="pics"))
    bad("load_arrays/npy-without-labels", r"\.npy file.*--labels", lambda t: A(_npy(t, X8)))
    bad("load_arrays/labels-length", r"labels .* must have shape \(4,\)", lambda t: A(_npz(t, x=X8, y=Y4[:3])))
    bad("load_arrays/labels-fractional", r"labels .* non-integer", lambda t: A(_npz(t, x=X8, y=Y4 + 0.5)))
    bad("load_arrays/labels-negative", r"labels .* >= 0", lambda t: A(_npz(t, x=X8, y=Y4 - 2)))
    bad("load_arrays/labels-text", r"labels .* dtype", lambda t: A(_npz(t, x=X8, y=np.array(list("abcd")))))
    bad("load_arrays/labels-beyond-num_classes", r"go up to 3, beyond the model's 2 classes",
        lambda t: A(_npz(t, x=X8, y=Y4), num_classes=2))
    bad("load_arrays/images-5d", r"must have shape \(N, C, H, W\)", lambda t: A(_npz(t, x=X8[None], y=Y4)))
    bad("load_arrays/images-2d", r"^images in .* must have shape \(N, C, H, W\), \(N, H, W, C\) or \(N, H, W\), got \(4, 64",
        lambda t: A(_npz(t, x=X8.reshape(4, 64), y=Y4)))
    bad("load_arrays/no-channel-axis", r"cannot tell the channel axis", lambda t: A(_npz(t, x=np.zeros((4, 5, 5, 5),
                                                                                                    np.float32), y=Y4)))
    bad("load_arrays/layout-bogus", r"layout must be nchw or nhwc", lambda t: A(_npz(t, x=X8, y=Y4), layout="hwcn"))
    bad("load_arrays/float-0-255", r"must lie in \[0, 1\].*scale=255", lambda t: A(_npz(t, x=X8 * 255, y=Y4)))
    bad("load_arrays/float-negative", r"must lie in \[0, 1\].*--mean", lambda t: A(_npz(t, x=X8 - 0.5, y=Y4)))
    bad("load_arrays/float-nan", r"^images in .* contain NaN or infinite values",
        lambda t: A(_npz(t, x=np.where(X8 > 0.5, np.nan, X8), y=Y4)))
    bad("load_arrays/int-out-of-range", r"integer images .* \[0, 255\].*1000",
        lambda t: A(_npz(t, x=np.full((4, 1, 8, 8), 1000, np.int16), y=Y4)))
    bad("load_arrays/bool-images", r"uint8 \(0-255\) or float", lambda t: A(_npz(t, x=X8 > 0.5, y=Y4)))
    bad("load_arrays/scale=0", r"^\bscale\b must be a number > 0 \(the value of a white pixel\)",
        lambda t: A(_npz(t, x=X8, y=Y4), scale=0))
    bad("load_arrays/empty", r"holds no images", lambda t: A(_npz(t, x=X8[:0], y=Y4[:0])))
    bad("load_arrays/truncated-npz", r"cannot read data file .*c\.npz: corrupt", lambda t: A(_write(t, "c.npz", _npz(
        t, "full.npz", x=X8, y=Y4).read_bytes()[:200])))


def _objects(tmp: Path) -> Path:
    np.save(tmp / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return tmp / "o.npy"


def _npy(tmp: Path, arr, name: str = "x.npy") -> Path:
    np.save(tmp / name, arr)
    return tmp / name


def _eps_cases():
    from advlab._util import parse_eps

    for text in ("abc", "8/0", "-8/255", "nan", "inf", "1/2/3", "8/x", "", "  "):
        bad(f"parse_eps/{text.strip() or 'empty'!s}{'-spaces' if text == '  ' else ''}", r"\beps\b",
            lambda t, v=text: parse_eps(v))
    for v in (None, True, [8, 255]):
        bad(f"parse_eps/{type(v).__name__}", r"\beps\b", lambda t, v=v: parse_eps(v))
    bad("parse_eps/named", r"attacks\[0\]\.params\.eps", lambda t: parse_eps("8/", "attacks[0].params.eps"))


def _inputs_cases():
    from advlab.models.inputs import load_inputs, parse_options

    bad("load_inputs/labels-beyond-model", r"labels of d\.npz go up to 11.*10 classes",
        lambda t: load_inputs(_ts(t), data=_npz(t, x=X8, y=np.array([0, 1, 2, 11]))))
    bad("load_inputs/images-do-not-fit", r"images of shape \(3, 8, 8\) from d\.npz do not fit the model",
        lambda t: load_inputs(_ts(t), data=_npz(t, x=np.repeat(X8, 3, 1), y=Y4)))
    bad("load_inputs/labels-without-data", r"--labels goes with --data", lambda t: load_inputs(_ts(t), labels="y.npy"))
    bad("load_inputs/no-dataset", r"--dataset is required", lambda t: load_inputs(_ts(t)))
    bad("load_inputs/unknown-array-option", r"--dataset-option grayscale does not apply",
        lambda t: load_inputs(_ts(t), data=_npz(t, x=X8, y=Y4), options={"grayscale": True}))
    bad("load_inputs/folder-empty", r"has no class subfolders",
        lambda t: load_inputs(_ts(t), data=_mkdir(t / "imgs")))
    bad("parse_options/no-equals", r"--dataset-option must be KEY=VALUE", lambda t: parse_options(["grayscale"]))
    bad("parse_options/bad-key", r"--dataset-option must be KEY=VALUE", lambda t: parse_options(["9x=1"]))
    bad("parse_options/bad-size", r"size must be H,W", lambda t: parse_options(["size=a,b"]))


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


_load_model_cases()
_read_weights_cases()
_array_cases()
_eps_cases()
_inputs_cases()


# --------------------------------------------------------------------------- CLI

def _cli_cases():
    def cmd(command: str, *extra: str, model=None, data=True):
        def argv(t: Path, f) -> List[str]:
            src = model(t) if callable(model) else (model or str(_ts(t)))
            out = [command, "--model", str(src), "--eps", "8/255", "--n", "2", "--out", str(t / "o"), "--quiet"]
            out += ["--attack", "fgsm"] if command == "attack" else ["--steps", "1", "--sweep", "none"]
            if data is True:
                out += ["--data", str(_npz(t, x=X8, y=Y4))]
            elif callable(data):
                out += list(data(t))
            return out + [str(e(t)) if callable(e) else e for e in extra]
        return argv

    no_report = absent("o")
    evil = lambda t: _write(t, "evil.pt", _evil_bytes(t / "PWNED"))  # noqa: E731

    def no_code_no_report(t: Path) -> None:
        absent("PWNED", "o")(t)

    for c in ("attack", "evaluate"):
        cli(f"{c}/model-hostile-pickle", r"evil\.pt is a plain pickle", cmd(c, model=evil), after=no_code_no_report)
        cli(f"{c}/model-hostile-named-pt2", r"evil\.pt2 is a plain pickle",
            cmd(c, model=lambda t: _write(t, "evil.pt2", _evil_bytes(t / "PWNED"))), after=no_code_no_report)
        cli(f"{c}/weights-hostile-pickle", r"evil\.pt is a plain pickle",
            cmd(c, "--weights", evil, model=_factory), after=no_code_no_report)
        cli(f"{c}/model-plain-pickle", r"full\.pt is a plain pickle.*torch\.export",
            cmd(c, model=lambda t: _torch(t, "full.pt", _lenet())), after=no_report)
        cli(f"{c}/model-state-dict-only", r"holds only weights.*--weights",
            cmd(c, model=lambda t: _torch(t, "sd.pt", _lenet().state_dict())), after=no_report)
        cli(f"{c}/model-module-missing", r"cannot import 'no_such_mod_xyz'", cmd(c, model="no_such_mod_xyz:f"),
            after=no_report)
        cli(f"{c}/weights-missing", r"weights file not found.*gone\.pt",
            cmd(c, "--weights", lambda t: str(t / "gone.pt"), model=_factory), after=no_report)
        cli(f"{c}/weights-do-not-fit", r"do not fit",
            cmd(c, "--weights", lambda t: str(_torch(t, "w.pt", {"a": torch.zeros(1)})), model=_factory),
            after=no_report)
        cli(f"{c}/mean-without-std", r"mean and std go together", cmd(c, "--mean", "0.5"), after=no_report)
        cli(f"{c}/mean-text", r"mean must be numbers", cmd(c, "--mean", "a,b", "--std", "0.5"), after=no_report)
        cli(f"{c}/mean-channels", r"mean/std have 3 values", cmd(c, "--mean", "0.4,0.4,0.4", "--std", "0.2,0.2,0.2"),
            after=no_report)
        cli(f"{c}/num-classes-mismatch", r"num_classes is 5 but the model .* gives 10", cmd(c, "--num-classes", "5"),
            after=no_report)
        cli(f"{c}/num-classes=1", r"--num-classes must be an integer >= 2", cmd(c, "--num-classes", "1"),
            after=no_report)
        cli(f"{c}/num-classes=abc", r"argument --num-classes: invalid int", cmd(c, "--num-classes", "abc"))
        cli(f"{c}/data-missing", r"data file not found.*gone\.npz",
            cmd(c, data=lambda t: ["--data", str(t / "gone.npz")]), after=no_report)
        cli(f"{c}/data-text-file", r"notes\.txt is not a numpy",
            cmd(c, data=lambda t: ["--data", str(_write(t, "notes.txt", b"hi\n"))]), after=no_report)
        cli(f"{c}/data-shape-does-not-fit", r"images of shape \(1, 5, 5\) from d\.npz do not fit",
            cmd(c, data=lambda t: ["--data", str(_npz(t, x=X8[:, :, :5, :5], y=Y4))]), after=no_report)
        cli(f"{c}/data-labels-beyond-model", r"labels of d\.npz go up to 12",
            cmd(c, data=lambda t: ["--data", str(_npz(t, x=X8, y=np.array([0, 1, 2, 12])))]), after=no_report)
        cli(f"{c}/data-float-0-255", r"must lie in \[0, 1\].*scale=255",
            cmd(c, data=lambda t: ["--data", str(_npz(t, x=X8 * 255, y=Y4))]), after=no_report)
        cli(f"{c}/npy-without-labels", r"--labels FILE\.npy",
            cmd(c, data=lambda t: ["--data", str(_npy(t, X8))]), after=no_report)
        cli(f"{c}/labels-without-data", r"--labels goes with --data",
            cmd(c, "--dataset", "digits", data=lambda t: ["--labels", str(_npy(t, Y4, "y.npy"))]), after=no_report)
        cli(f"{c}/dataset-option-malformed", r"--dataset-option must be KEY=VALUE",
            cmd(c, "--dataset-option", "grayscale"), after=no_report)
        cli(f"{c}/dataset-option-unknown", r"--dataset-option colour does not apply",
            cmd(c, "--dataset-option", "colour=1"), after=no_report)
        cli(f"{c}/dataset-option-named-dataset", r"dataset 'digits' takes no option\(s\) size",
            cmd(c, "--dataset", "digits", "--dataset-option", "size=8", data=False), after=no_report)
        cli(f"{c}/no-dataset-for-foreign-model", r"--dataset is required", cmd(c, data=False), after=no_report)
        cli(f"{c}/eps-zero-denominator", r"argument --eps", lambda t, f: [
            x if x != "8/255" else "8/0" for x in cmd(c)(t, f)])
    cli("evaluate/eps-fraction-text", r"argument --eps: invalid float or fraction '8/x'",
        lambda t, f: [x if x != "8/255" else "8/x" for x in cmd("evaluate")(t, f)])
    cli("attack/eps-list-bad-fraction", r"argument --eps: invalid eps '0.1,8/x'",
        lambda t, f: [x if x != "8/255" else "0.1,8/x" for x in cmd("attack")(t, f)])
    cli("evaluate/negative-fraction", r"--eps must be a finite number >= 0",
        lambda t, f: cmd("evaluate")(t, f) + ["--eps=-8/255"], after=no_report)
    cli("defend/model-alias-foreign-model", r"not an advlab checkpoint",
        lambda t, f: ["defend", "msvdd", "--model", str(_torch(t, "sd.pt", _lenet().state_dict())), "--out",
                      str(t / "o")], after=no_report)


_cli_cases()


# --------------------------------------------------------------------------- run the catalogues

@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # factory modules are written here; a default output would land here too
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    return tmp_path


@pytest.mark.parametrize("cid", catalogue_params(LOAD_CASES))
def test_load_bad_input(cid, in_tmp):
    check_api_case(LOAD_CASES[cid], in_tmp, leftovers)


@pytest.mark.parametrize("cid", catalogue_params(LOAD_CLI_CASES))
def test_load_cli_bad_input(cid, in_tmp, capsys):
    c = LOAD_CLI_CASES[cid]
    rc, err = _run(c.argv(in_tmp, {}), capsys)
    check_cli_case(c, rc, err, in_tmp, leftovers)


#: the distinct bad inputs this file was built with; it may grow, never shrink below this
BUILT_LOAD = 167


def test_fuzz_load_catalogue_count(capsys):
    n_api, n_cli = len(LOAD_CASES), len(LOAD_CLI_CASES)
    assert not set(LOAD_CASES) & set(LOAD_CLI_CASES)
    with capsys.disabled():
        print(f"\nadvlab fuzz catalogue (issue 19, bring your own model and data): {n_api + n_cli} distinct bad inputs "
              f"({n_api} Python API, {n_cli} CLI)")
    assert n_api + n_cli >= BUILT_LOAD
